"""Batches for training and validation, in the two kinds that --loader names.

    memory   MemoryLoader: the whole data set as uint8 tensors on the training device, batched and
             augmented there (rot90, flips, colour) with no worker process or host-device copy.
    workers  WorkersLoader: a DataLoader whose worker processes decode (if not cached) and augment
             each image with albumentations; for data sets that do not fit in memory, and crops.

Both yield (images float32 (B, C_in, H, W) normalised, masks float32 (B, C, H, W) of 0/1,
{"img_id": [ids]}), and both depend only on (seed, epoch): call set_epoch() before each epoch.
Normalisation is normalize.py's, in its two steps: to_unit (with each image's intensity range, taken on the
whole image), the augmentation, then standardize.
"""
import os
from dataclasses import dataclass, fields

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from config import MEMORY_CANNOT_CROP
from normalize import Normalization, as_batch, image_ranges, resize_image, standardize, to_unit
from runtime import memory_bytes
from utils import UserError


AFFINE = {"scale": (0.8, 1.2), "shift": 0.0625, "degrees": 45}   # --affine's ranges, on both loaders


def train_transform(input_h, input_w, input_channels, crop=False, affine=0.0):
    """The reference's training augmentation, in albumentations 2.x terms, without its Normalize (normalize.py's
    standardize follows it).

    crop: a random input_h x input_w crop of the full-size image (padded if smaller) instead of resizing.
    affine: probability of a random scale, shift and rotation (AFFINE), mirrored at the borders.
    """
    import albumentations as A   # here: a run on the memory loader never needs it (a second saved at start-up)
    colour = [A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.0, p=1),
              A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.2, p=1)]
    if input_channels == 3:
        colour.insert(0, A.HueSaturationValue(p=1))
    geometric = [A.Affine(scale=AFFINE["scale"], translate_percent=(-AFFINE["shift"], AFFINE["shift"]),
                          rotate=(-AFFINE["degrees"], AFFINE["degrees"]), border_mode=cv2.BORDER_REFLECT_101,
                          p=affine)] if affine else []
    return A.Compose([
        A.RandomRotate90(),
        A.HorizontalFlip(),
        A.VerticalFlip(),
        *geometric,
        A.OneOf(colour, p=1),
        *fit_to_input(input_h, input_w, crop, "RandomCrop"),
    ])


def val_transform(input_h, input_w, crop=False):
    """For crop-trained runs, a centre crop of the validation image (val.py tiles whole images instead); None
    when images are resized to the input (done with resize_image, exactly as val.py does)."""
    if not crop:
        return None
    import albumentations as A
    return A.Compose([*fit_to_input(input_h, input_w, crop, "CenterCrop")])


def fit_to_input(input_h, input_w, crop, crop_name):
    """[Resize], or [PadIfNeeded, the albumentations crop named] when training on crops of full-size images."""
    import albumentations as A
    if not crop:
        return [A.Resize(input_h, input_w)]
    return [A.PadIfNeeded(input_h, input_w, border_mode=cv2.BORDER_REFLECT_101), getattr(A, crop_name)(input_h, input_w)]


class AlbumentationsDataset(torch.utils.data.Dataset):
    """Yields (image float32 (C_in, H, W) normalised, mask float32 (C, H, W) of 0/1, {'img_id': id}).

    For training, 8-bit images are augmented as they are (the reference's colour changes round to whole grey
    levels), then brought to 0..1; other types are brought to 0..1 first (albumentations' colour changes work on
    uint8 and float32 only). transform None (validation): resized to `size` as val.py resizes. Augmentation is seeded from (seed, epoch,
    index), so an epoch's batches depend only on the seed and the epoch number: a resumed run sees exactly what
    an uninterrupted one would. Call set_epoch() before each epoch (DataLoader workers copy the dataset).
    """

    def __init__(self, data, transform, norm, size, seed=0, train=True):
        self.data, self.transform, self.norm, self.size, self.seed, self.epoch = data, transform, norm, size, seed, 0
        self.train = train

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.data.ids)

    def __getitem__(self, idx):
        raw = self.data.image(idx)
        ranges = image_ranges([raw], self.norm)                                   # of the whole image
        mask = self.data.mask(idx) if self.data.labeled else None
        # training on other types than uint8: to 0..1 first, because the colour changes need uint8 or 0..1 float32
        unit_first = self.transform is not None and self.train and raw.dtype != np.uint8
        if self.transform is None:                                                # validation: resized as val.py does
            image = resize_image(raw, self.size)
            mask = None if mask is None else cv2.resize(mask, self.size[::-1], interpolation=cv2.INTER_NEAREST)
        else:
            if unit_first:
                raw = to_unit(as_batch([raw]), ranges, self.norm)[0].permute(1, 2, 0).numpy()
            self.transform.set_random_seed(hash((self.seed, self.epoch, idx)) % 2**32)
            out = self.transform(image=raw) if mask is None else self.transform(image=raw, mask=mask)
            image, mask = out["image"], out.get("mask")
        x = as_batch([image])                                                     # (1, C_in, H, W)
        x = x if unit_first else to_unit(x, ranges, self.norm)
        image = standardize(x, self.norm)[0]
        if mask is None:                                                          # unlabelled: an empty mask
            return image, torch.zeros(0), {"img_id": self.data.ids[idx]}
        mask = torch.from_numpy(mask.reshape(*image.shape[1:], -1).transpose(2, 0, 1).astype(np.float32))  # (C, H, W)
        return image, mask, {"img_id": self.data.ids[idx]}


def shard(order, rank, world, drop_remainder):
    """This process's share of an epoch's index order: every world-th index from `rank`.

    drop_remainder gives every process the same count (training: equal batch counts keep DDP in
    step); without it (validation) every image is seen exactly once across the processes.
    """
    if drop_remainder:
        order = order[: len(order) - len(order) % world]
    return order[rank::world]


class EpochSampler(torch.utils.data.Sampler):
    """An epoch's indices: a permutation from the loader's generator (or 0..n-1), this process's shard."""

    def __init__(self, n, generator, shuffle, rank, world):
        self.n, self.generator, self.shuffle, self.rank, self.world = n, generator, shuffle, rank, world

    def indices(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        return shard(order, self.rank, self.world, drop_remainder=self.shuffle).tolist()

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return len(shard(torch.arange(self.n), self.rank, self.world, drop_remainder=self.shuffle))


VALIDATION_PIXELS = 32 * 96 * 96   # pixels in a validation batch, at most (unless the training batch has more)


def batch_size(cfg, train):
    """Images per batch: the config's for training; for validation up to 4 times that, within VALIDATION_PIXELS.
    A forward pass without gradients needs far less memory than a training step, and fewer, larger batches
    validated a narrow UNet on a CPU in half the time (0.43 s against 0.94 s for 134 images), fewer launches on a
    GPU. The scores do not change: IoU counts are summed over the images, the loss averaged per image."""
    if train:
        return cfg["batch_size"]
    fits = VALIDATION_PIXELS // (cfg["input_h"] * cfg["input_w"])
    return max(cfg["batch_size"], min(4 * cfg["batch_size"], fits))


def epoch_seed(seed, epoch):
    """One integer per (seed, epoch): an epoch's shuffle and augmentation depend on nothing else."""
    return hash((seed, epoch)) % 2**63


class WorkersLoader:
    """--loader workers: a DataLoader over AlbumentationsDataset (albumentations in worker processes).

    The streaming path: used when the data set should not be held on the device, or when asked for.
    """
    kind = "workers"

    def __init__(self, data, cfg, rt, train):
        h, w, c = cfg["input_h"], cfg["input_w"], cfg["input_channels"]
        transform = train_transform(h, w, c, cfg["crop"], cfg["affine"]) if train else val_transform(h, w, cfg["crop"])
        self.ids = data.ids
        self.dataset = AlbumentationsDataset(data, transform, Normalization.from_config(cfg, data.dtypes), (h, w),
                                             seed=cfg["seed"], train=train)
        self.seed, self.generator = cfg["seed"], torch.Generator()
        sampler = EpochSampler(len(self.dataset), self.generator, train, rt.rank, rt.world)
        workers = min(cfg["num_workers"], usable_cores(rt.world))
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size(cfg, train), sampler=sampler, drop_last=train,
            num_workers=workers, pin_memory=rt.cuda, prefetch_factor=4 if workers else None)

    def set_epoch(self, epoch):
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        self.dataset.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


BRIGHTNESS, CONTRAST, HSV = 0, 1, 2   # AugmentDraws.colour: which colour change an image gets (HSV: RGB only)


@dataclass(frozen=True)
class AugmentDraws:
    """MemoryLoader's random draws for its augmentation, one float per image in each field: (n,) for an epoch,
    (B, 1, 1, 1) for a batch (of_batch), to broadcast over images (B, C, H, W)."""
    turns: torch.Tensor         # quarter turns: 0..3 (square inputs), 0 or 2 (others)
    h_flip: torch.Tensor        # 1: flipped left-right
    v_flip: torch.Tensor        # 1: flipped upside down
    colour: torch.Tensor        # BRIGHTNESS, CONTRAST or HSV
    brightness: torch.Tensor    # added to the 0..1 image: -0.2..0.2
    contrast: torch.Tensor      # the 0..1 image times 0.8..1.2
    hue: torch.Tensor           # degrees: -40..40
    saturation: torch.Tensor    # -30..30, of 128 (HueSaturationValue's units)
    value: torch.Tensor         # -20..20, of 255

    def of_batch(self, batch):
        """The draws of the images at `batch` (a slice of the epoch's order), each (B, 1, 1, 1)."""
        return AugmentDraws(*(getattr(self, f.name)[batch].view(-1, 1, 1, 1) for f in fields(self)))


class MemoryLoader:
    """--loader memory: the whole data set as uint8 tensors on the device, batched and augmented there.

    Images are resized to the network input once, up front. Training batches get the same kinds
    of augmentation as train_transform, computed batched in torch on the device: a random
    rotation by a multiple of 90 degrees (180 only, for non-square inputs), horizontal and
    vertical flips, and one colour change per image (brightness, contrast, or - for RGB - a
    hue/saturation/value shift, approximated by a rotation in YIQ space). The random draws come
    from a CPU generator seeded per epoch, so results depend on (seed, epoch) and not on the device.
    """

    kind = "memory"

    def __init__(self, data, cfg, rt, train):
        input_h, input_w, device = cfg["input_h"], cfg["input_w"], rt.device
        n, self.norm = len(data.ids), Normalization.from_config(cfg, data.dtypes)
        raw = [data.image(k) for k in range(n)]
        ranges = image_ranges(raw, self.norm)                       # each image's range, taken at its own size
        images = np.stack([resize_image(im, (input_h, input_w)) for im in raw])
        del raw
        masks = np.stack([cv2.resize(data.mask(k), (input_w, input_h), interpolation=cv2.INTER_NEAREST)
                          .reshape(input_h, input_w, -1) for k in range(n)])
        # (N, C_in, H, W) in the images' own type (uint8, uint16 or float32: nothing rounded to 8 bits)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
        self.masks = torch.from_numpy(masks).permute(0, 3, 1, 2).contiguous().to(device)    # (N, C, H, W) uint8 0/1
        self.ranges = ranges.to(device)                                                   # (N, 2, C_in)
        self.ids, self.batch_size, self.device, self.train = data.ids, batch_size(cfg, train), device, train
        self.seed, self.affine = cfg["seed"], cfg["affine"]
        self.rank, self.world = rt.rank, rt.world
        self.square = input_h == input_w
        self.generator = torch.Generator().manual_seed(self.seed)
        self.yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=device)
        self.yiq_inverse = torch.linalg.inv(self.yiq)

    def set_epoch(self, epoch):
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self):
        n = len(shard(range(len(self.ids)), self.rank, self.world, drop_remainder=self.train))
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.ids)
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        order = shard(order, self.rank, self.world, drop_remainder=self.train)
        order_on_device = order.to(self.device)                 # one host-to-device copy per epoch, not per batch
        draws = self.epoch_draws(len(order)) if self.train else None
        affine = self.affine_draws(len(order)) if self.train and self.affine else None
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = order_on_device[batch]
            images = to_unit(self.images[idx].float(), self.ranges[idx], self.norm)   # (B, C_in, H, W) about 0..1
            masks = self.masks[idx].float()                      # (B, C, H, W)
            if affine is not None:
                images, masks = self.warp(images, masks, affine[batch])
            if self.train:
                images, masks = self.augment(images, masks, draws.of_batch(batch))
            yield standardize(images, self.norm), masks, {"img_id": [self.ids[i] for i in order[batch].tolist()]}

    def epoch_draws(self, n):
        """The epoch's AugmentDraws for n images: every random number of the epoch, drawn on the CPU in this order
        (the order fixes what a seed gives), moved to the device in one copy."""
        g, rgb = self.generator, self.images.shape[1] == 3
        turns = torch.randint(0, 4, (n,), generator=g) if self.square else 2 * torch.randint(0, 2, (n,), generator=g)
        drawn = {"turns": turns.float(),
                 "h_flip": (torch.rand(n, generator=g) < 0.5).float(),
                 "v_flip": (torch.rand(n, generator=g) < 0.5).float(),
                 "colour": torch.randint(0, 3 if rgb else 2, (n,), generator=g).float(),
                 "brightness": torch.rand(n, generator=g) * 0.4 - 0.2,
                 "contrast": torch.rand(n, generator=g) * 0.4 + 0.8,
                 "hue": torch.rand(n, generator=g) * 80 - 40,
                 "saturation": torch.rand(n, generator=g) * 60 - 30,
                 "value": torch.rand(n, generator=g) * 40 - 20}
        on_device = torch.stack(list(drawn.values())).to(self.device)
        return AugmentDraws(**dict(zip(drawn, on_device)))

    def affine_draws(self, n):
        """(n, 2, 3) affine_grid matrices of the epoch: with probability --affine a random scale, shift and rotation
        (AFFINE), else the identity. Drawn after epoch_draws, so runs without --affine see the same numbers."""
        g = self.generator
        apply = (torch.rand(n, generator=g) < self.affine).float()
        low, high = AFFINE["scale"]
        scale = 1 + apply * (torch.rand(n, generator=g) * (high - low) + low - 1)
        angle = apply * (torch.rand(n, generator=g) * 2 - 1) * AFFINE["degrees"] * torch.pi / 180
        shift = apply[:, None] * (torch.rand(n, 2, generator=g) * 2 - 1) * AFFINE["shift"] * 2   # in [-1, 1] units
        h, w = self.images.shape[2:]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # a rotation in pixels, written in affine_grid's [-1, 1] coordinates (x spans w pixels, y spans h)
        theta = torch.stack([torch.stack([cos, -sin * h / w, shift[:, 0]], 1),
                             torch.stack([sin * w / h, cos, shift[:, 1]], 1)], 1)
        return theta.to(self.device)

    def warp(self, images, masks, theta):
        """Images and masks (B, C, H, W) resampled through the affine matrices theta (B, 2, 3): the image bilinearly,
        the mask bilinearly and thresholded at 0.5, both mirrored at the borders."""
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return images, (masks > 0.5).float()

    def augment(self, images, masks, d):
        """Per-image rot90/flips (image and mask alike) and one colour change; d: this batch's AugmentDraws.

        Selections use torch.where over whole batches, so nothing waits for the device.
        """
        c = images.shape[1]
        both = out = torch.cat([images, masks], 1)      # image and mask turned together: half the operations
        for turns in ((1, 2, 3) if self.square else (2,)):
            out = torch.where(d.turns == turns, torch.rot90(both, turns, dims=(2, 3)), out)
        out = torch.where(d.h_flip == 1, out.flip(3), out)
        out = torch.where(d.v_flip == 1, out.flip(2), out)
        return self.colour(out[:, :c], d), out[:, c:]

    def colour(self, x, d):
        """One of: brightness +-0.2, contrast x(0.8..1.2), or (RGB) hue +-40 deg / saturation / value shift."""
        out = torch.where(d.colour == BRIGHTNESS, x + d.brightness, x * d.contrast)
        if x.shape[1] == 3:
            out = torch.where(d.colour == HSV, self.hsv_shift(x, d), out)
        return out.clamp(0, 1)

    def hsv_shift(self, x, d):
        """Hue rotation (YIQ), saturation scale and value shift, per image: HueSaturationValue's defaults, roughly."""
        y = torch.einsum("ij,bjhw->bihw", self.yiq, x)                       # (B, 3, H, W): Y, I, Q
        theta = d.hue[:, 0] * torch.pi / 180                                 # (B, 1, 1)
        sat = 1 + d.saturation[:, 0] / 128
        cos, sin = torch.cos(theta) * sat, torch.sin(theta) * sat
        i, q = y[:, 1] * cos - y[:, 2] * sin, y[:, 1] * sin + y[:, 2] * cos
        y = torch.stack([y[:, 0] + d.value[:, 0] / 255, i, q], 1)
        return torch.einsum("ij,bjhw->bihw", self.yiq_inverse, y)

LOADERS = {"memory": MemoryLoader, "workers": WorkersLoader}


def usable_cores(processes=1):
    """CPU cores this process may use, shared by the training processes on this machine: more loader workers than
    that only contend (and PyTorch warns about it), and the results do not depend on their number."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:               # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    return max(1, cores // max(1, local))


def make_loaders(cfg, train_data, val_data, rt):
    """(training loader: reshuffled per epoch, last partial batch dropped; validation loader), of the kind
    --loader chooses. Under torchrun each process loads its shard of every epoch."""
    kind = choose_loader(cfg["loader"], train_data, cfg, rt)
    return LOADERS[kind](train_data, cfg, rt, True), LOADERS[kind](val_data, cfg, rt, False)


def choose_loader(kind, data, cfg, rt):
    """--loader auto: keep the data set on the device when all of it is cached in memory and it takes
    under a quarter of the device's free memory; otherwise stream it through DataLoader workers."""
    if kind == "memory" and cfg["crop"]:
        raise UserError(MEMORY_CANNOT_CROP)
    itemsize = max([np.dtype(d).itemsize for d in data.dtypes] or [1])
    nbytes = len(data.ids) * cfg["input_h"] * cfg["input_w"] * (cfg["input_channels"] * itemsize + cfg["num_classes"])
    if kind == "memory" and nbytes > memory_bytes(rt) / 2:
        raise UserError(f"--loader memory would hold the training split resized to {cfg['input_w']}x{cfg['input_h']}: "
                        f"{nbytes / 2**30:.1f} GiB, more than half of the {memory_bytes(rt) / 2**30:.0f} GiB there is; "
                        "use --loader workers (or auto), or a smaller input size")
    if kind != "auto":
        return kind
    if not data.fully_cached or cfg["crop"]:
        return "workers"
    if rt.cuda:
        free, _ = torch.cuda.mem_get_info(rt.device)
        return "memory" if nbytes < free / 4 else "workers"
    return "memory" if nbytes < 2 * 2**30 else "workers"
