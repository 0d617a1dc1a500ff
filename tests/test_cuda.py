"""The CUDA paths, run by tools/gpu_check.sh on a GPU (and on the CPU at toy sizes with --cuda-dry-run, so they do
not rot): backend agreement on the device in float32 and under bf16 autocast, fp16 with the gradient scaler, no
host synchronisation inside a sparse pretraining step, a DDP step in one process (NCCL on a GPU), and
--augment-on-device's decoding on the device against the CPU's (nvJPEG against libjpeg-turbo: the difference is
recorded in the check's results)."""
import pytest
import torch
from PIL import Image

from fcmae.runtime.optim import adamw
from fcmae.runtime.step import train_step
from models import create_fcmae, random_mask
from tests.conftest import randomize_grn

pytestmark = pytest.mark.cuda


def models_on(device, backends=("sparse", "dense"), size=64):
    torch.manual_seed(0)
    base = randomize_grn(create_fcmae("convnextv2_atto", backend="sparse"))
    out = {}
    for name in backends:
        m = create_fcmae("convnextv2_atto", backend=name)
        m.load_state_dict(base.state_dict())
        out[name] = m.to(device)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, size, size, generator=g).to(device)
    mask = random_mask(3, (size // 32) ** 2, 0.6, generator=g).to(device)
    return out, imgs, mask


def loss_and_grads(model, imgs, mask, amp=None):
    model.zero_grad()
    with torch.autocast(imgs.device.type, dtype=amp, enabled=amp is not None):
        loss = model(imgs, mask)[0]
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_sparse_matches_dense_on_the_device_float32(gpu):
    models, imgs, mask = models_on(gpu)
    (ls, gs), (ld, gd) = (loss_and_grads(models[n], imgs, mask) for n in ("sparse", "dense"))
    assert rel(ls, ld) < 1e-4
    assert set(gs) == set(gd)
    worst = max(rel(gs[k], gd[k]) for k in gd)
    assert worst < 1e-3, worst


def test_sparse_matches_dense_under_bf16_autocast(gpu):
    models, imgs, mask = models_on(gpu)
    (ls, gs), (ld, gd) = (loss_and_grads(models[n], imgs, mask, torch.bfloat16) for n in ("sparse", "dense"))
    ref, _ = loss_and_grads(models["dense"], imgs, mask)
    assert torch.isfinite(ls) and torch.isfinite(ld)
    assert rel(ls, ld) < 2e-2 and rel(ls, ref) < 2e-2  # bf16 keeps ~3 significant digits
    assert all(torch.isfinite(g).all() for g in gs.values())


def test_fp16_step_with_the_scaler(gpu):
    if gpu.type != "cuda":
        pytest.skip("fp16 autocast with a gradient scaler is a CUDA path")
    models, imgs, mask = models_on(gpu, ("sparse",))
    model = models["sparse"]
    optimizer = adamw(model.parameters(), 1e-4, (0.9, 0.95), gpu.type)
    scaler = torch.amp.GradScaler("cuda")
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        loss, grad_norm, finite = train_step(model, [(imgs, mask)], optimizer, scaler, gpu, "fp16")
    assert bool(finite) and torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_sparse_training_step_never_syncs(gpu, amp):
    """torch.cuda.set_sync_debug_mode("error") raises at any host synchronisation (an .item(), a bool of a
    device tensor, nonzero, a device-to-host copy): a whole step (forward, backward, clipping, fused AdamW with
    the device-side non-finite skip) must pass. The first step runs outside the check (lazy initialisation)."""
    models, imgs, mask = models_on(gpu, ("sparse",))
    model = models["sparse"]
    optimizer = adamw(model.parameters(), 1e-4, (0.9, 0.95), gpu.type)
    scaler = torch.amp.GradScaler(gpu.type, enabled=False)
    micro = [(imgs, mask)]
    train_step(model, micro, optimizer, scaler, gpu, amp, clip_grad=1.0)
    if gpu.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        loss, grad_norm, finite = train_step(model, micro, optimizer, scaler, gpu, amp, clip_grad=1.0)
    finally:
        if gpu.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert bool(finite) and torch.isfinite(loss)


def test_ddp_step_in_one_process(gpu, tmp_path):
    """DistributedDataParallel over the sparse model in a group of one (NCCL on a GPU, gloo on the CPU): two steps
    (the second finds a parameter the first left unused, were there one), finite, the weights moved."""
    import torch.distributed as dist

    backend = "nccl" if gpu.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        models, imgs, mask = models_on(gpu, ("sparse",))
        model = models["sparse"]
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[gpu.index or 0] if gpu.type == "cuda"
                                                        else None)
        optimizer = adamw(model.parameters(), 1e-4, (0.9, 0.95), gpu.type)
        scaler = torch.amp.GradScaler(gpu.type, enabled=False)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            loss, grad_norm, finite = train_step(net, [(imgs, mask)], optimizer, scaler, gpu, "bf16")
        assert bool(finite) and torch.isfinite(loss) and torch.isfinite(grad_norm)
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_augment_on_device_decodes_like_the_cpu(gpu, tmp_path, record_property):
    """--augment-on-device on the device against the same batch on the CPU (same boxes and flips): plain, grey,
    progressive and EXIF-rotated JPEGs, and a PNG that falls back to the CPU path. The mean absolute difference
    in grey levels (nvJPEG's IDCT and chroma upsampling against libjpeg-turbo's) is recorded."""
    from fcmae.data.device_augment import DeviceAugment, DeviceJpegs, EncodedJpeg, JpegBatch
    from fcmae.data.folders import image_folder
    from fcmae.data.sampling import SeededDataset
    from fcmae.data.transforms import pretrain_transform
    from tools.bench_loader import make_jpegs, photos

    make_jpegs(str(tmp_path), 8, (500, 375), classes=1)
    folder = tmp_path / "class_00"
    photo = photos()[0]
    Image.fromarray(photo).convert("L").save(folder / "grey.jpg", quality=90)
    Image.fromarray(photo).save(folder / "progressive.jpg", quality=90, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo[:300]).save(folder / "rotated.jpg", quality=90, exif=exif)
    Image.fromarray(photo[:200, :300]).save(folder / "fallback.png")
    files = image_folder(str(folder), transform=pretrain_transform((224, 224)), input_size=(224, 224))
    jpegs = SeededDataset(DeviceJpegs(files), seed=0, rngs=("torch",))
    samples = [jpegs[i][0] for i in range(len(files))]
    assert sum(isinstance(s, EncodedJpeg) for s in samples) == len(files) - 1
    batch = JpegBatch.of(samples)
    augment = DeviceAugment((224, 224), 3, files)
    on_device = augment(batch.to(gpu, non_blocking=True)).cpu()
    on_cpu = augment(batch)
    assert on_device.shape == on_cpu.shape == (len(files), 3, 224, 224) and on_device.dtype == torch.uint8
    diff = (on_device.float() - on_cpu.float()).abs()
    per_image = diff.mean((1, 2, 3))
    record_property("mean_abs_diff_device_vs_cpu_decoder", f"{diff.mean().item():.3f}")
    record_property("worst_image_mean_abs_diff", f"{per_image.max().item():.3f}")
    record_property("device_batches_decoded_one_by_one", augment.batches_one_by_one)
    record_property("device_files_decoded_on_the_host", augment.on_host)
    assert files.bad_indices() == []
    assert per_image.max() < 4, per_image  # a wrong box, flip or orientation would differ by tens of grey levels
    fallback = [k for k, s in enumerate(samples) if not isinstance(s, EncodedJpeg)]
    assert torch.equal(on_device[fallback], on_cpu[fallback])
