"""FCMAE pretraining of ConvNeXt V2: `python -m fcmae.pretrain --model convnextv2_atto ...` (console script
`fcmae-pretrain`). Parse and check the options, read the data and the starting point, build, then run the shared
training loop (fcmae.runtime.loop).

From image to loss: fcmae/pretrain/data.py (images -> augmented tensors and masks) -> models/fcmae.py (sparse
encoder, decoder, loss) -> fcmae/runtime/step.py (one optimiser step) -> fcmae/runtime/loop.py (the loop);
fcmae/pretrain/stage.py adds pictures, the collapse monitor and the kNN monitor.
"""
import logging

import torch
from timm.optim import param_groups_weight_decay

from fcmae.data.sampling import EpochLoader
from fcmae.runtime.cli import exit_with
from fcmae.runtime.distributed import device_for, in_process_group, world_size_from_env, wrap_ddp
from fcmae.runtime.loop import Loop, run_settings
from fcmae.runtime.optim import adamw, epoch_steps, lr_for_run, optimisation
from fcmae.runtime.options import parse_with_config, plain
from fcmae.runtime.run_start import Start, check_same_settings, find_start, open_output
from models import create_fcmae
from models.ablations import remove_grn
from models.fcmae import compile_for_training
from models.masking import mask_grid

from .data import KnnSets, MaskedImages, PretrainData, knn_data, pretrain_data
from .options import START_RULES, build_parser, validate
from .stage import KnnMonitor, PretrainStage

log = logging.getLogger("fcmae")


def main(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
    validate(args)
    # Everything that reads user input (data, checkpoints) before anything is written or a process group joined:
    data = pretrain_data(args)
    steps_per_epoch = epoch_steps(len(data.dataset), args.batch_size, args.accum_iter, world_size_from_env())
    knn_sets = knn_data(args) if args.knn_every_epochs else None
    start = find_start(args.output_dir, args.resume, args.overwrite, START_RULES)
    start = check_same_settings(start, plain(args), START_RULES)
    return in_process_group(args.device, lambda dist_info: train(args, dist_info, data=data, knn_sets=knn_sets,
                                                                 steps_per_epoch=steps_per_epoch, start=start))


def build_model(args, device):
    model = create_fcmae(args.model, backend=args.backend, grn_stats=args.grn_stats, mask_ratio=args.mask_ratio,
                         decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                         norm_pix_loss=args.norm_pix_loss, in_chans=args.in_chans)
    if not args.encoder_grn:
        remove_grn(model.encoder)
    model.encoder.grad_checkpointing = args.grad_checkpointing
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def train(args, dist_info, *, data: PretrainData, knn_sets: KnnSets, steps_per_epoch: int, start: Start) -> dict:
    device = device_for(args.device, dist_info)
    open_output(args.output_dir, dist_info, start, args.overwrite)
    torch.manual_seed(args.seed + dist_info.rank)
    model = build_model(args, device)
    net = wrap_ddp(model, dist_info, device)
    if args.compile:
        compile_for_training(model)  # in place: state-dict keys do not change
    lr = lr_for_run(args, dist_info.world_size)
    # no weight decay on 1-D tensors, biases and the mask token (the reference decayed GRN and the token by accident)
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=["mask_token"])
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
    opt = optimisation(adamw(groups, lr, (0.9, 0.95), device.type), args, steps_per_epoch, device.type)

    # Masks are drawn per sample from (seed, epoch, index) like the augmentation: the same on any number of
    # processes, with any accumulation, and after a resume. The pretraining transform and the mask draw only from
    # torch's generator: only that is seeded per sample.
    grid = mask_grid(*args.input_size)
    loader = EpochLoader(MaskedImages(data.dataset, grid[0] * grid[1], args.mask_ratio), seed=args.seed,
                         rank=dist_info.rank, world_size=dist_info.world_size, batch_size=args.batch_size,
                         num_workers=args.num_workers, pin_memory=device.type == "cuda", rngs=("torch",),
                         collate_fn=data.collate)
    knn = None
    if knn_sets is not None:
        knn = KnnMonitor(knn_sets, every_epochs=args.knn_every_epochs, k=args.knn_k,
                         num_workers=min(args.num_workers, 2))
    description = (f"pretraining {args.model} ({args.backend} backend, grn {args.grn_stats}) on {len(data.dataset)} "
                   f"images of {args.in_chans} channels at {'x'.join(map(str, args.input_size))}"
                   f"{' (JPEGs decoded and augmented on the device)' if args.augment_on_device else ''}, mask "
                   f"{args.mask_ratio:.2f}, {steps_per_epoch} steps/epoch")
    stage = PretrainStage(model=model, net=net, data=data, dataset=loader.dataset,
                          vis_every_epochs=args.vis_every_epochs, knn=knn, show_channels=args.show_channels,
                          description=description)
    loop = Loop(run_settings(args, steps_per_epoch), stage=stage, loader=loader, optimisation=opt,
                dist_info=dist_info, device=device, prepare=data.prepare)
    loop.resume(start)
    return loop.run()


def cli(argv=None):
    exit_with(main, argv)
