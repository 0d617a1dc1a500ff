"""ConvNeXt V2 FCMAE pretraining and fine-tuning."""
from setuptools import find_packages, setup

setup(
    name="fcmae",
    version="0.1.0",
    description="ConvNeXt V2 FCMAE self-supervised pretraining with sparse, dense and MinkowskiEngine backends",
    python_requires=">=3.10",
    packages=find_packages(include=["fcmae", "fcmae.*", "finetune", "finetune.*", "models", "models.*"]),
    include_package_data=True,
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm>=1.0.15,<1.1",
        "numpy",
        "tensorboard",
        "pyyaml",
        "safetensors",
        "pillow",
        "tifffile",  # multi-band, 16-bit and float TIFF / GeoTIFF
        "imagecodecs",  # the compressions TIFFs use (LZW, deflate, ...)
    ],
    extras_require={
        "dev": ["pytest", "transformers>=4.40", "scikit-image", "matplotlib"],
        # MinkowskiEngine must be built from source against the installed torch; tools/setup.sh does it
        # (see README, "MinkowskiEngine"). Listed so that `pip install .[minkowski]` documents the need.
        "minkowski": ["MinkowskiEngine==0.5.4", "ninja"],
    },
    entry_points={
        "console_scripts": [
            "fcmae-pretrain=fcmae.pretrain.cli:cli",
            "fcmae-finetune=finetune.cli:main",
            "fcmae-convert=fcmae.tools.convert:main",
            "fcmae-make-shards=fcmae.tools.make_shards:main",
            "fcmae-data-stats=fcmae.tools.data_stats:main",
            "fcmae-visualize=fcmae.tools.visualize:main",
            "fcmae-knn=fcmae.tools.knn_eval:main",
        ]
    },
)
