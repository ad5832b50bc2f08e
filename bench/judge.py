"""The judge of sample quality that bench/learning.py and bench/quality.py share (docs/judges.md says why it is built
this way and how to read it).

    judge = Judge.fit(train_images, train_labels, held_out_images, held_out_labels, seed=0)
    judge.ceiling                           # the CNN's accuracy on the real held-out images
    scores = judge.score(samples, requested_labels)

Images are uint8 (N, H, W, 3) as sample.py writes them, uint8 (N, 3, H, W) as the datasets hold them, or float
(N, 3, H, W) in [-1, 1] as the models produce them; every image the judge sees has the training images' size.

The judge is built from the real images only:
- a small CNN trained on the real training images at their own resolution, without augmentation (no mirror
  images: a mirrored sample of an asymmetric class counts as wrong); its accuracy on the real held-out images is
  the ceiling of the class accuracy;
- the Frechet distance between its penultimate features of the samples and of the real held-out images, with the
  floor the same distance gives for as many real training images;
- precision and recall with k-nearest-neighbour manifolds in the same features (Kynkaenniemi et al. 2019, k=3):
  precision is the share of samples that lie on the real images' manifold, recall the share of real images that
  lie on the samples' (mode dropping lowers recall);
- a cross-check built differently: an RBF SVM on the pixels area-averaged to 8x8, reporting its own class
  accuracy (and its own ceiling).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.stats import frechet, frechet_distance, gaussian  # noqa: F401 (the tests import them from here)

K_NEIGHBOURS = 3  # Kynkaenniemi et al. 2019 use k=3
DEFAULT_STEPS = 600  # CNN updates of 128 images: 48 epochs of the digit scans, 8 of the 10,000 shapes


# ----------------------------------------------------------------------------- inputs


def to_float_images(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (N, 3, H, W), or float (N, 3, H, W) in [-1, 1] -> float32 (N, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"images must be 4-d (N, H, W, 3) or (N, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"images must have 3 channels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [-1, 1], got {x.dtype}")
    x = x.float().contiguous()
    if x.numel() and (x.min() < -1.001 or x.max() > 1.001):  # 0..1 or 0..255 floats would be judged silently wrong
        raise ValueError(f"float images must lie in [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}]")
    return x


def to_labels(labels) -> np.ndarray:
    return np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)


def load_real(data: str, image_size: int, split: str, root: str | None = None, limit: int | None = None,
              seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Real images float (n, 3, S, S) in [-1, 1] at `image_size` and labels (n,) of a labelled dataset split
    (`core.data.load_dataset`, through its item interface: `dataset[i]` is (image, label)). With `limit`, a seeded
    random subset of that many (of `shapes`, the first ones, which are balanced over the classes and generated on
    demand)."""
    from core.data import ShapesDataset, load_dataset

    if data == "shapes" and limit:
        dataset = ShapesDataset(image_size, split, num_images=limit)
    else:
        dataset = load_dataset(data, image_size, split, root=root)
    pick = np.arange(len(dataset))
    if limit and limit < len(dataset):
        pick = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:limit])
    items = [dataset[i] for i in pick.tolist()]
    images = torch.stack([image for image, _ in items]) if items else torch.empty(0, 3, image_size, image_size)
    labels = np.array([label for _, label in items], dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{data} is unlabelled: judging class-conditional samples needs class subfolders")
    return images, labels


@torch.inference_mode()
def reconstruction_score(judge: Judge, tokenizer, images: torch.Tensor, labels: np.ndarray, num: int, *,
                         seed: int = 0, batch: int = 250, device="cpu", context=None, bootstrap: int = 0) -> dict:
    """The judge's scores of the tokenizer's reconstructions of `num` real images (a seeded random pick): the class
    accuracy a faithful generator on that tokenizer can reach, and the Frechet distance its own blur costs.

    `tokenizer` has encode(images) -> codes and decode(codes) -> images in [-1, 1]; `context` () -> a context
    manager wrapped around each batch (autocast on a GPU)."""
    pick = torch.as_tensor(np.random.default_rng(seed).permutation(len(images))[:num])
    out = []
    for x in images[pick].split(batch):
        with (context or nullcontext)():
            out.append(tokenizer.decode(tokenizer.encode(x.to(device))).float().clamp(-1, 1).cpu())
    return judge.score(torch.cat(out), np.asarray(labels)[pick.numpy()], bootstrap=bootstrap)


# ----------------------------------------------------------------------------- the main judge: a CNN


class JudgeNet(nn.Module):
    """Small CNN: images (b, 3, S, S) in [-1, 1] -> penultimate features (b, feat) -> class logits (b, classes).

    Three conv-BN-ReLU-maxpool blocks (width, 2 width, 4 width), a conv, global average pooling, a linear layer to
    the features. The Frechet distance and the manifolds use the features before the ReLU of the head, so that no
    feature is dead (constant)."""

    def __init__(self, num_classes: int, width: int = 32, feat: int = 64):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(
            *block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width),
            nn.Conv2d(4 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, feat),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feat, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def train_net(images: torch.Tensor, labels: np.ndarray, num_classes: int, *, steps: int, batch_size: int = 128,
              width: int = 32, lr: float = 3e-3, weight_decay: float = 5e-4, seed: int = 0,
              device="cpu") -> JudgeNet:
    """JudgeNet trained for `steps` AdamW updates with a one-cycle LR, on the images as they are (no augmentation).

    Seeded from `seed` alone; the caller's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = JudgeNet(num_classes, width=width).to(device)
    images = images.to(device)
    y = torch.as_tensor(labels, dtype=torch.long).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    order, done = torch.randperm(len(images), generator=gen), 0
    net.train()
    for _ in range(steps):  # epochs of a fresh random order each; the last partial batch of an epoch is dropped
        if done + batch_size > len(order):
            order, done = torch.randperm(len(images), generator=gen), 0
        idx = order[done: done + batch_size].to(device)
        done += batch_size
        loss = F.cross_entropy(net(images[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


# ----------------------------------------------------------------------------- the cross-check: an SVM on pixels


class PixelSVM:
    """RBF SVM (C=10, gamma 'scale') on the images area-averaged to 8x8, RGB, values 0..16.

    On grey images (the digit scans) this is the SVM on 8x8 greyscale that bench/learning.py used before: the three
    equal channels triple every squared distance and gamma='scale' divides it back out."""

    name = "RBF SVM on 8x8 pixels"

    def __init__(self, max_train: int = 5000):
        from sklearn.svm import SVC

        self.svm = SVC(C=10.0, gamma="scale")
        self.max_train = max_train

    @staticmethod
    def features(images: torch.Tensor) -> np.ndarray:
        small = F.adaptive_avg_pool2d(images.float(), 8)  # (n, 3, 8, 8)
        return ((small + 1) * 8).flatten(1).numpy()  # (n, 192) in [0, 16]

    def fit(self, images: torch.Tensor, labels: np.ndarray, seed: int = 0) -> "PixelSVM":
        if len(images) > self.max_train:  # an SVM's fit grows with the square of the training set
            keep = np.random.default_rng(seed).permutation(len(images))[: self.max_train]
            images, labels = images[torch.as_tensor(keep)], labels[keep]
        self.svm.fit(self.features(images), labels)
        return self

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.svm.predict(self.features(images))


# ----------------------------------------------------------------------------- the measures


def _pairwise(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    return torch.cdist(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


def knn_radii(feats: np.ndarray, k: int = K_NEIGHBOURS) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point (the radius of its ball in the manifold)."""
    if len(feats) <= k:
        raise ValueError(f"k-NN manifolds need more than k={k} points, got {len(feats)}")
    return _pairwise(feats, feats).kthvalue(k + 1, dim=1).values  # the smallest distance is the point itself


def coverage_of(points: np.ndarray, manifold: np.ndarray, k: int = K_NEIGHBOURS) -> float:
    """Share of `points` inside the union of the k-NN balls of `manifold` (Kynkaenniemi et al. 2019)."""
    radii = knn_radii(manifold, k)  # (m,)
    chunks = np.array_split(points, max(1, len(points) // 1024))
    inside = [(_pairwise(chunk, manifold) <= radii).any(1) for chunk in chunks]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of `fake` against `real` features (n, d).

    Precision: share of fake points within the k-NN manifold of the real ones (are the samples realistic?).
    Recall: share of real points within the k-NN manifold of the fake ones (is all of the real data covered?)."""
    return coverage_of(fake, real, k), coverage_of(real, fake, k)


def class_accuracy(predicted, requested, num_classes: int) -> tuple[float, list[float]]:
    """Share of samples predicted as the class they were asked for, overall and per requested class (nan for a
    class no sample asked for)."""
    predicted, requested = to_labels(predicted), to_labels(requested)
    hit = predicted == requested
    per_class = [float(hit[requested == c].mean()) if (requested == c).any() else float("nan")
                 for c in range(num_classes)]
    return float(hit.mean()), per_class


def binomial_std(p: float, n: int) -> float:
    """Standard deviation of an accuracy p measured on n independent samples."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


# ----------------------------------------------------------------------------- the judge


@dataclass
class Judge:
    """A fitted judge: the CNN, the cross-check and the real features the samples are compared with."""

    net: JudgeNet
    cross_check: PixelSVM
    num_classes: int
    image_size: tuple[int, int]
    held_out_features: np.ndarray   # (m, feat): the reference every set of samples is compared with
    train_features: np.ndarray      # (n, feat): the pool the real-vs-real floor draws from
    ceiling: float                  # the CNN's accuracy on the real held-out images
    cross_check_ceiling: float      # the cross-check's accuracy on them
    seed: int = 0
    info: dict = field(default_factory=dict)
    _floors: dict = field(default_factory=dict, repr=False)

    @classmethod
    def fit(cls, train_images, train_labels, held_out_images, held_out_labels, seed: int = 0, *,
            steps: int | None = None, width: int = 32, cross_check_max_train: int = 5000,
            device="cpu") -> "Judge":
        """Train the CNN (`steps` updates of 128 images; default: DEFAULT_STEPS) and the cross-check on the real
        training images; measure both on the real held-out images. The CNN runs on `device`, the SVM on the CPU."""
        start = time.process_time()
        train_x, held_x = to_float_images(train_images), to_float_images(held_out_images)
        train_y, held_y = to_labels(train_labels), to_labels(held_out_labels)
        if len(train_x) != len(train_y) or len(held_x) != len(held_y):
            raise ValueError("every image needs one label")
        if train_y.min() < 0 or held_y.min() < 0:
            raise ValueError("the judge needs labelled images (labels >= 0)")
        if train_x.shape[-2:] != held_x.shape[-2:]:
            raise ValueError(f"training images are {tuple(train_x.shape[-2:])}, held-out {tuple(held_x.shape[-2:])}")
        num_classes = int(max(train_y.max(), held_y.max())) + 1
        steps = steps or DEFAULT_STEPS
        net = train_net(train_x, train_y, num_classes, steps=steps, width=width, seed=seed, device=device)
        cross = PixelSVM(cross_check_max_train).fit(train_x, train_y, seed=seed)
        judge = cls(net, cross, num_classes, tuple(train_x.shape[-2:]), np.empty((0, 0)), np.empty((0, 0)), 0.0, 0.0,
                    seed)
        held_pred, judge.held_out_features = judge.classify(held_x)
        _, judge.train_features = judge.classify(train_x)
        judge.ceiling = float((held_pred == held_y).mean())
        judge.cross_check_ceiling = float((cross.predict(held_x) == held_y).mean())
        judge.info = {"train": len(train_x), "held_out": len(held_x), "steps": steps, "width": width,
                      "cross_check_train": min(len(train_x), cross_check_max_train),
                      "cpu_s": time.process_time() - start}
        return judge

    @torch.inference_mode()
    def classify(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes (n,) and float64 penultimate features (n, feat) of the CNN."""
        x = to_float_images(images)
        if tuple(x.shape[-2:]) != tuple(self.image_size):
            raise ValueError(f"the judge was trained on {self.image_size} images, got {tuple(x.shape[-2:])}")
        preds, feats = [], []
        device = next((p.device for p in self.net.parameters()), torch.device("cpu"))
        for chunk in x.split(500):
            f = self.net.features(chunk.to(device)).float()
            preds.append(self.net.head(f).argmax(-1).cpu())
            feats.append(f.double().cpu())
        return torch.cat(preds).numpy(), torch.cat(feats).numpy()

    def manifold_scores(self, feats: np.ndarray) -> tuple[float, float]:
        """Precision and recall of features against the held-out reference, at equal set sizes (the k-NN radii
        depend on how many points a set has): the larger set is split into random parts of the smaller one's size,
        and the figures are averaged over the parts."""
        real, rng = self.held_out_features, np.random.default_rng(self.seed)
        m = min(len(feats), len(real))
        if m <= K_NEIGHBOURS:
            return float("nan"), float("nan")
        if len(feats) >= len(real):  # parts of the samples, each against all of the reference
            order = rng.permutation(len(feats))
            pairs = [precision_recall(real, feats[order[i: i + m]]) for i in range(0, len(feats) - m + 1, m)]
        else:  # parts of the reference, each against all of the samples
            order = rng.permutation(len(real))
            pairs = [precision_recall(real[order[i: i + m]], feats) for i in range(0, len(real) - m + 1, m)]
        return float(np.mean([p for p, _ in pairs])), float(np.mean([r for _, r in pairs]))

    def floor(self, n: int) -> dict:
        """FD, precision and recall of n real training images (drawn at random, seeded) against the held-out
        reference: what a generator that reproduced the training set would score with n samples."""
        n = min(n, len(self.train_features))
        if n not in self._floors:
            pick = np.random.default_rng(self.seed + 1).permutation(len(self.train_features))[:n]
            feats = self.train_features[pick]
            precision, recall = self.manifold_scores(feats)
            self._floors[n] = {"fd": frechet_distance(feats, self.held_out_features) if n > 1 else float("nan"),
                               "precision": precision, "recall": recall}
        return self._floors[n]

    def score(self, samples, requested_labels, *, bootstrap: int = 0) -> dict:
        """Class accuracy (overall, per requested class, the worst class), FD with its floor, precision and recall
        with theirs, and the cross-check's class accuracy, of samples asked for `requested_labels`.

        With `bootstrap` > 1, also `fd_std`: the standard deviation of the FD over that many resamples of the
        samples (seeded)."""
        x = to_float_images(samples)
        requested = to_labels(requested_labels)
        if len(x) != len(requested):
            raise ValueError(f"{len(x)} samples but {len(requested)} requested labels")
        predicted, feats = self.classify(x)
        accuracy, per_class = class_accuracy(predicted, requested, self.num_classes)
        asked = [a for a in per_class if not math.isnan(a)]
        precision, recall = self.manifold_scores(feats)
        floor = self.floor(len(x))
        out = {"n": len(x), "accuracy": accuracy, "accuracy_std": binomial_std(accuracy, len(x)),
               "per_class": per_class, "worst_class": min(asked) if asked else float("nan"),
               "worst_class_index": int(np.nanargmin(per_class)) if asked else -1,
               "fd": frechet_distance(feats, self.held_out_features) if len(x) > 1 else float("nan"),
               "fd_floor": floor["fd"], "precision": precision, "recall": recall,
               "precision_floor": floor["precision"], "recall_floor": floor["recall"],
               "cross_check_accuracy": float((self.cross_check.predict(x) == requested).mean()),
               "ceiling": self.ceiling, "cross_check_ceiling": self.cross_check_ceiling}
        if bootstrap > 1:
            rng, real = np.random.default_rng(self.seed), gaussian(self.held_out_features)
            boot = [frechet(gaussian(feats[rng.integers(0, len(feats), len(feats))]), real) for _ in range(bootstrap)]
            out["fd_std"] = float(np.std(boot))
        return out

    def describe(self) -> str:
        """One line on how the judge was built and its ceilings."""
        i = self.info
        return (f"CNN (width {i.get('width')}, {self.held_out_features.shape[1]}-d features) trained on "
                f"{i.get('train')} real images at {self.image_size[0]}x{self.image_size[1]} for {i.get('steps')} "
                f"updates, no "
                f"augmentation; ceiling (held-out real accuracy, {i.get('held_out')} images) {self.ceiling:.1%}. "
                f"Cross-check: {self.cross_check.name} trained on {i.get('cross_check_train')} images, held-out "
                f"accuracy {self.cross_check_ceiling:.1%}. Fit in {i.get('cpu_s', float('nan')):.0f} s CPU")
