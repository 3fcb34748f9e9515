"""Image/mask discovery, up-front validation, decoding into memory, augmentation.

Layout (as in the reference):
    <root>/images/<id><img_ext>
    <root>/masks/<class>/<id><mask_ext>      class = 0 .. num_classes-1

Every image and mask is decoded once, checked, and kept in memory (uint8), so an epoch never
decodes a file again and every problem with the data is reported before training starts.
"""
import os
import warnings

import albumentations as A
import cv2
import numpy as np
import torch
from sklearn.model_selection import train_test_split

from utils import UserError

MAX_LISTED = 10                           # file names shown in one error message
IMAGENET_MEAN = (0.485, 0.456, 0.406)     # Normalize() defaults, per RGB channel
IMAGENET_STD = (0.229, 0.224, 0.225)


def listing(names):
    """'a, b, c' with at most MAX_LISTED names, then '... and N more'."""
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def find_ids(folder, ext):
    """Sorted ids (file names without `ext`) in `folder`; an empty or wrong-extension folder is a UserError."""
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder} does not exist; put your images there, or pass --data_dir/--dataset "
                        "(or --images) pointing at the folder that holds them")
    files = [f for f in os.listdir(folder) if not f.startswith(".")]
    ids = sorted(f[: -len(ext)] for f in files if f.endswith(ext) and os.path.isfile(os.path.join(folder, f)))
    if ids:
        return ids
    if not files:
        raise UserError(f"No input file found in {folder}, make sure you put your images there")
    found = sorted({os.path.splitext(f)[1] for f in files if os.path.splitext(f)[1]})
    raise UserError(f"no file ending in '{ext}' in {folder} (it holds files ending in {', '.join(found) or '(none)'}); "
                    f"pass the right extension, e.g. --img_ext {found[0] if found else '.png'}")


def decode(path):
    """cv2.imread with IMREAD_UNCHANGED; an unreadable, empty or truncated file is a UserError."""
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED) if os.path.getsize(path) > 0 else None
    if img is None:
        raise UserError(f"cannot read image file {path}: it is empty, truncated or not an image. "
                        "Replace it or remove it (and its mask) from the data set.")
    return img


def read_image(path, input_channels):
    """8-bit grayscale/RGB/RGBA file -> uint8 (H, W, input_channels), RGB order, alpha dropped."""
    img = decode(path)
    if img.dtype != np.uint8:
        raise UserError(f"image {path} is {img.dtype}, not 8-bit; convert your images to 8-bit "
                        "(e.g. scale 16-bit microscopy to 0..255) before training")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]                                   # drop alpha
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == input_channels:
        return np.ascontiguousarray(img)
    if input_channels == 3 and img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)                      # grayscale replicated
    if input_channels == 1 and img.shape[2] == 3:
        if (img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 1] == img[:, :, 2]).all():
            return np.ascontiguousarray(img[:, :, :1])        # grayscale stored as RGB
        raise UserError(f"image {path} is in colour but --input_channels is 1; pass --input_channels 3, "
                        "or convert the images to grayscale first")
    raise UserError(f"image {path} has {img.shape[2]} channels; --input_channels must be 1 (grayscale) or 3 (RGB)")


def read_mask(path):
    """8-bit single-channel mask file -> uint8 (H, W) with its raw values."""
    m = decode(path)
    if m.dtype != np.uint8:
        raise UserError(f"mask {path} is {m.dtype}; masks must be 8-bit single-channel PNGs with foreground > 127. "
                        "Convert it (e.g. (mask > 0) * 255 as uint8).")
    if m.ndim == 3:
        raise UserError(f"mask {path} has {m.shape[2]} channels; masks must be 8-bit single-channel "
                        "(grayscale) with foreground > 127. Save it as grayscale.")
    return m


def class_folders(mask_root, num_classes):
    """Checks masks/0 .. masks/<num_classes-1> exist and no other class folder does."""
    if not os.path.isdir(mask_root):
        raise UserError(f"mask folder {mask_root} does not exist; put each class's masks in "
                        f"{mask_root}/<class>/ (class 0 .. num_classes-1), named like the images")
    present = sorted(d for d in os.listdir(mask_root) if os.path.isdir(os.path.join(mask_root, d)))
    expected = [str(c) for c in range(num_classes)]
    if present != expected:
        raise UserError(f"{mask_root} holds class folders [{', '.join(present)}] but --num_classes {num_classes} "
                        f"expects [{', '.join(expected)}]; pass --num_classes {len(present) or 1} or fix the folders")
    return [os.path.join(mask_root, c) for c in expected]


def check_pairs(image_ids, mask_dir, mask_ext):
    """Every image has a mask in mask_dir and every mask an image; mismatches listed by name."""
    mask_ids = set(find_ids(mask_dir, mask_ext))
    no_mask = set(image_ids) - mask_ids
    no_image = mask_ids - set(image_ids)
    if no_mask:
        raise UserError(f"{len(no_mask)} image(s) have no mask in {mask_dir}: {listing(no_mask)}. "
                        f"Add the masks (named <id>{mask_ext}) or remove those images.")
    if no_image:
        raise UserError(f"{len(no_image)} mask(s) in {mask_dir} have no image: {listing(no_image)}. "
                        "Add the images or remove those masks.")


class SegmentationData:
    """A validated data set: ids, and per image its uint8 (H, W, C_in) image and (H, W, C) 0/1 mask.

    Decoded images are cached in memory up to a byte budget; the rest are read from disk again
    when asked for (image(k), mask(k)), with the same result. masks is None for unlabeled images.
    """

    def __init__(self, ids, images, masks, paths=None, input_channels=3, threshold=127):
        self.ids, self.images, self.masks = ids, images, masks
        self.paths = paths                    # per image: (image path, [mask path per class]), for uncached reads
        self.input_channels, self.threshold = input_channels, threshold

    @classmethod
    def from_folder(cls, root, img_ext, mask_ext, num_classes, input_channels, cache_bytes=None):
        """Checks every file (decoding each once) and keeps the decoded arrays while they fit in cache_bytes."""
        if not os.path.isdir(root):
            raise UserError(f"data set folder {root} does not exist; create it with images/ and masks/0/ inside, "
                            "or pass --data_dir and --dataset so that <data_dir>/<dataset> is your data")
        ids = find_ids(os.path.join(root, "images"), img_ext)
        mask_dirs = class_folders(os.path.join(root, "masks"), num_classes)
        for d in mask_dirs:
            check_pairs(ids, d, mask_ext)
        images, masks, paths, used, peak = [], [], [], 0, 0
        for i in ids:
            img_path = os.path.join(root, "images", i + img_ext)
            mask_paths = [os.path.join(d, i + mask_ext) for d in mask_dirs]
            img = read_image(img_path, input_channels)
            planes = [read_mask(p) for p in mask_paths]
            for p, m in zip(mask_paths, planes):
                if m.shape != img.shape[:2]:
                    raise UserError(f"mask {p} is {m.shape[1]}x{m.shape[0]} but its image "
                                    f"{img_path} is {img.shape[1]}x{img.shape[0]}; masks must match their image's size")
            mask = np.stack(planes, axis=2)                        # (H, W, C) raw values
            peak = max(peak, int(mask.max()))
            keep = cache_bytes is None or used + img.nbytes + mask.nbytes <= cache_bytes
            used += (img.nbytes + mask.nbytes) if keep else 0
            images.append(img if keep else None)
            masks.append(mask if keep else None)
            paths.append((img_path, mask_paths))
        threshold = mask_threshold(peak, root)
        masks = [None if m is None else (m > threshold).astype(np.uint8) for m in masks]
        return cls(ids, images, masks, paths, input_channels, threshold)

    @property
    def labeled(self):
        return self.masks is not None

    @property
    def fully_cached(self):
        return all(i is not None for i in self.images)

    def image(self, k):
        """uint8 (H, W, C_in), from the cache or decoded from disk."""
        if self.images[k] is not None:
            return self.images[k]
        return read_image(self.paths[k][0], self.input_channels)

    def mask(self, k):
        """uint8 (H, W, C) of 0/1, from the cache or decoded from disk."""
        if self.masks[k] is not None:
            return self.masks[k]
        return (np.stack([read_mask(p) for p in self.paths[k][1]], axis=2) > self.threshold).astype(np.uint8)

    def subset(self, ids):
        index = {i: k for k, i in enumerate(self.ids)}
        pick = [index[i] for i in ids]
        return SegmentationData(list(ids), [self.images[k] for k in pick],
                                None if self.masks is None else [self.masks[k] for k in pick],
                                None if self.paths is None else [self.paths[k] for k in pick],
                                self.input_channels, self.threshold)


def mask_threshold(peak, root):
    """Foreground is > 127; a data set whose masks only hold 0/1 is accepted (> 0) with one warning."""
    if peak == 1:
        warnings.warn(f"the masks under {root}/masks hold only the values 0 and 1; reading 1 as foreground. "
                      "(The expected format is 0 = background, 255 = foreground.)", stacklevel=3)
        return 0
    return 127


def cache_budget(cache_mb):
    """--cache_mb -> bytes; 0 = automatic: half the memory available now, shared by this node's processes."""
    if cache_mb > 0:
        return int(cache_mb * 2**20)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def split_ids(ids, val_split, split_seed):
    """(train_ids, val_ids) exactly as the reference: sorted ids, sklearn's train_test_split."""
    n_val = int(np.ceil(val_split * len(ids))) if val_split > 0 else 0
    if n_val < 1 or n_val >= len(ids):
        raise UserError(f"--val_split {val_split} on {len(ids)} images leaves {n_val} validation and "
                        f"{len(ids) - n_val} training images; both need at least one. Add images or change --val_split.")
    train_ids, val_ids = train_test_split(ids, test_size=val_split, random_state=split_seed)
    return train_ids, val_ids


def normalize_stats(input_channels):
    """Per-channel (mean, std) for Normalize: ImageNet's for RGB, their average for grayscale."""
    if input_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)


def train_transform(input_h, input_w, input_channels, crop=False):
    """The reference's training augmentation, in albumentations 2.x terms.

    crop: a random input_h x input_w crop of the full-size image (padded if smaller) instead of resizing.
    """
    mean, std = normalize_stats(input_channels)
    colour = [A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.0, p=1),
              A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.2, p=1)]
    if input_channels == 3:
        colour.insert(0, A.HueSaturationValue(p=1))
    return A.Compose([
        A.RandomRotate90(),
        A.HorizontalFlip(),
        A.VerticalFlip(),
        A.OneOf(colour, p=1),
        *fit_to_input(input_h, input_w, crop, A.RandomCrop),
        A.Normalize(mean=mean, std=std),  # -> float32 (x/255 - mean) / std; no second /255
    ])


def val_transform(input_h, input_w, input_channels, crop=False):
    """Resize to the input (or, for crop-trained runs, a centre crop); val.py tiles whole images instead."""
    mean, std = normalize_stats(input_channels)
    return A.Compose([*fit_to_input(input_h, input_w, crop, A.CenterCrop), A.Normalize(mean=mean, std=std)])


def normalize_transform(input_channels):
    """Normalisation alone, for whole images predicted by tiling."""
    mean, std = normalize_stats(input_channels)
    return A.Compose([A.Normalize(mean=mean, std=std)])


def fit_to_input(input_h, input_w, crop, crop_class):
    """[Resize], or [PadIfNeeded, a crop] when training on crops of full-size images."""
    if not crop:
        return [A.Resize(input_h, input_w)]
    return [A.PadIfNeeded(input_h, input_w, border_mode=cv2.BORDER_REFLECT_101), crop_class(input_h, input_w)]


class SegDataset(torch.utils.data.Dataset):
    """Yields (image float32 (C_in, H, W), mask float32 (C, H, W) of 0/1, {'img_id': id}).

    Augmentation is seeded from (seed, epoch, index), so an epoch's batches depend only on the
    seed and the epoch number: a resumed run sees exactly what an uninterrupted one would.
    Call set_epoch() before each epoch (DataLoader workers copy the dataset when they start).
    """

    def __init__(self, data, transform, seed=0):
        self.data, self.transform, self.seed, self.epoch = data, transform, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.data.ids)

    def __getitem__(self, idx):
        self.transform.set_random_seed(hash((self.seed, self.epoch, idx)) % 2**32)
        if not self.data.labeled:  # unlabeled images (val.py --images): an empty mask
            out = self.transform(image=self.data.image(idx))
            mask = torch.zeros(0)
        else:
            out = self.transform(image=self.data.image(idx), mask=self.data.mask(idx))
            mask = torch.from_numpy(out["mask"].transpose(2, 0, 1).astype(np.float32))  # (C, H, W)
        image = torch.from_numpy(out["image"].transpose(2, 0, 1).copy())                 # (C_in, H, W)
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


def epoch_seed(seed, epoch):
    """One integer per (seed, epoch): an epoch's shuffle and augmentation depend on nothing else."""
    return hash((seed, epoch)) % 2**63


class EpochLoader:
    """A DataLoader over SegDataset (albumentations in worker processes) with set_epoch() for seeding.

    The streaming path: used when the data set should not be held on the device, or when asked for.
    """

    def __init__(self, data, transform, batch_size, num_workers, device, seed, train, rank=0, world=1):
        self.dataset = SegDataset(data, transform, seed=seed)
        self.seed, self.generator = seed, torch.Generator()
        sampler = EpochSampler(len(self.dataset), self.generator, train, rank, world)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
            num_workers=num_workers, pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None)

    def set_epoch(self, epoch):
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        self.dataset.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


class TensorLoader:
    """The whole data set as uint8 tensors on the device, batched and augmented there.

    Images are resized to the network input once, up front. Training batches get the same kinds
    of augmentation as train_transform, computed batched in torch on the device: a random
    rotation by a multiple of 90 degrees (180 only, for non-square inputs), horizontal and
    vertical flips, and one colour change per image (brightness, contrast, or - for RGB - a
    hue/saturation/value shift, approximated by a rotation in YIQ space). The random draws come
    from a CPU generator seeded per epoch, so results depend on (seed, epoch) and not on the device.
    """

    def __init__(self, data, input_h, input_w, batch_size, device, seed, train, rank=0, world=1):
        n = len(data.ids)
        images = np.stack([cv2.resize(data.image(k), (input_w, input_h), interpolation=cv2.INTER_LINEAR)
                           .reshape(input_h, input_w, -1) for k in range(n)])
        masks = np.stack([cv2.resize(data.mask(k), (input_w, input_h), interpolation=cv2.INTER_NEAREST)
                          .reshape(input_h, input_w, -1) for k in range(n)])
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)  # (N, C_in, H, W) uint8
        self.masks = torch.from_numpy(masks).permute(0, 3, 1, 2).contiguous().to(device)    # (N, C, H, W) uint8 0/1
        mean, std = normalize_stats(self.images.shape[1])
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.ids, self.batch_size, self.device, self.seed, self.train = data.ids, batch_size, device, seed, train
        self.rank, self.world = rank, world
        self.square = input_h == input_w
        self.generator = torch.Generator().manual_seed(seed)
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
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = order_on_device[batch]
            images = self.images[idx].float() / 255              # (B, C_in, H, W) in 0..1
            masks = self.masks[idx].float()                      # (B, C, H, W)
            if self.train:
                images, masks = self.augment(images, masks, draws[:, batch])
            yield (images - self.mean) / self.std, masks, {"img_id": [self.ids[i] for i in order[batch].tolist()]}

    def epoch_draws(self, n):
        """(9, n): every random number of the epoch, drawn on the CPU, moved to the device in one copy.

        Rows: rot90 turns, h-flip, v-flip, colour choice, brightness, contrast, hue (deg), saturation, value.
        """
        g, rgb = self.generator, self.images.shape[1] == 3
        turns = torch.randint(0, 4, (n,), generator=g) if self.square else 2 * torch.randint(0, 2, (n,), generator=g)
        return torch.stack([
            turns.float(),
            (torch.rand(n, generator=g) < 0.5).float(),
            (torch.rand(n, generator=g) < 0.5).float(),
            torch.randint(0, 3 if rgb else 2, (n,), generator=g).float(),
            torch.rand(n, generator=g) * 0.4 - 0.2,
            torch.rand(n, generator=g) * 0.4 + 0.8,
            torch.rand(n, generator=g) * 80 - 40,
            torch.rand(n, generator=g) * 60 - 30,
            torch.rand(n, generator=g) * 40 - 20,
        ]).to(self.device)

    def augment(self, images, masks, d):
        """Per-image rot90/flips (image and mask alike) and one colour change; d: this batch's (9, B) draws.

        Selections use torch.where over whole batches, so nothing waits for the device.
        """
        b = images.shape[0]
        per_image = d.view(9, b, 1, 1, 1)
        out_images, out_masks = images, masks
        for turns in ((1, 2, 3) if self.square else (2,)):
            chosen = per_image[0] == turns
            out_images = torch.where(chosen, torch.rot90(images, turns, dims=(2, 3)), out_images)
            out_masks = torch.where(chosen, torch.rot90(masks, turns, dims=(2, 3)), out_masks)
        for row, dim in ((1, 3), (2, 2)):   # horizontal, then vertical flip
            flip = per_image[row] == 1
            out_images = torch.where(flip, out_images.flip(dim), out_images)
            out_masks = torch.where(flip, out_masks.flip(dim), out_masks)
        return self.colour(out_images, per_image), out_masks

    def colour(self, x, d):
        """One of: brightness +-0.2, contrast x(0.8..1.2), or (RGB) hue +-40 deg / saturation / value shift."""
        out = torch.where(d[3] == 0, x + d[4], x * d[5])
        if x.shape[1] == 3:
            out = torch.where(d[3] == 2, self.hsv_shift(x, d), out)
        return out.clamp(0, 1)

    def hsv_shift(self, x, d):
        """Hue rotation (YIQ), saturation scale and value shift, per image: HueSaturationValue's defaults, roughly."""
        y = torch.einsum("ij,bjhw->bihw", self.yiq, x)                       # (B, 3, H, W): Y, I, Q
        theta = d[6, :, 0] * torch.pi / 180                                  # (B, 1, 1)
        sat = 1 + d[7, :, 0] / 128
        cos, sin = torch.cos(theta) * sat, torch.sin(theta) * sat
        i, q = y[:, 1] * cos - y[:, 2] * sin, y[:, 1] * sin + y[:, 2] * cos
        y = torch.stack([y[:, 0] + d[8, :, 0] / 255, i, q], 1)
        return torch.einsum("ij,bjhw->bihw", self.yiq_inverse, y)


def make_loader(kind, data, cfg, device, train, rank=0, world=1):
    """'memory' -> TensorLoader on the device, 'workers' -> EpochLoader (albumentations in DataLoader workers).

    rank/world: under torchrun each process loads its shard of every epoch.
    """
    h, w, c = cfg["input_h"], cfg["input_w"], cfg["input_channels"]
    if kind == "memory":
        return TensorLoader(data, h, w, cfg["batch_size"], device, cfg["seed"], train, rank, world)
    transform = train_transform(h, w, c, cfg["crop"]) if train else val_transform(h, w, c, cfg["crop"])
    return EpochLoader(data, transform, cfg["batch_size"], cfg["num_workers"], device, cfg["seed"], train, rank, world)


def choose_loader(kind, data, cfg, device):
    """--loader auto: keep the data set on the device when all of it is cached in memory and it takes
    under a quarter of the device's free memory; otherwise stream it through DataLoader workers."""
    if kind == "memory" and cfg["crop"]:
        raise UserError("--loader memory resizes images to the input size; with --crop use --loader workers (or auto)")
    if kind != "auto":
        return kind
    if not data.fully_cached or cfg["crop"]:
        return "workers"
    nbytes = len(data.ids) * cfg["input_h"] * cfg["input_w"] * (cfg["input_channels"] + cfg["num_classes"])
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return "memory" if nbytes < free / 4 else "workers"
    return "memory" if nbytes < 2 * 2**30 else "workers"

