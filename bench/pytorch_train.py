#!/usr/bin/env python3
"""PyTorch twin of greyfed's `examples/train_bench.rs`: local training throughput.

    python3 bench/pytorch_train.py --model blocknet --data ../shared/data/mnist-10k --threads 1
    python3 bench/pytorch_train.py --model cnn --data ../shared/data/mnist-10k --threads 2 --epochs 2

Same models (participant/src/model.rs, model/cnn.rs, model/vit.rs), same
data (the whole train and test splits of an IDX directory, raw or .gz files,
raw preferred), same input scaling (pixels p -> p / 127.5 - 1, i.e. [-1, 1]),
batch 64, Adam (betas 0.9/0.999, eps 1e-8, no weight decay), a fresh shuffle
per epoch with the last batch smaller, mean cross-entropy. Initialisation is
PyTorch's default, which is the distribution greyfed draws from
(U(+-1/sqrt(fan_in)) for conv and linear weights and biases; layer norms 1/0;
the ViT's position embedding U(+-0.02)).

Tensors are pre-loaded (no DataLoader, no workers); intra-op threads are
`--threads`, inter-op threads 1. Only the training loop is timed, after an
untimed warm-up of `--warmup-batches` batches on a throwaway copy of the
model (as the Rust example does). Progress goes to stderr; stdout gets
exactly one line: `images_per_sec=X accuracy=Y peak_rss_mb=Z` (peak RSS from
resource.getrusage, ru_maxrss).
"""

import argparse
import copy
import gzip
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BATCH_SIZE = 64


# ----------------------------------------------------------------- data


def _read_idx(directory, name):
    raw = os.path.join(directory, name)
    if os.path.exists(raw):
        with open(raw, "rb") as f:
            return f.read()
    gz = raw + ".gz"
    if os.path.exists(gz):
        with gzip.open(gz, "rb") as f:
            return f.read()
    sys.exit(f"found neither {name} nor {name}.gz in {directory}")


def _images(directory, name):
    data = _read_idx(directory, name)
    magic, count, rows, cols = np.frombuffer(data[:16], dtype=">u4")
    if magic != 0x0803:
        sys.exit(f"{name}: not an IDX image file (magic {magic:#x})")
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16)
    return pixels[: count * rows * cols].reshape(count, 1, rows, cols)


def _labels(directory, name):
    data = _read_idx(directory, name)
    magic, count = np.frombuffer(data[:8], dtype=">u4")
    if magic != 0x0801:
        sys.exit(f"{name}: not an IDX label file (magic {magic:#x})")
    return np.frombuffer(data, dtype=np.uint8, offset=8)[:count]


def load_split(directory, prefix):
    """Images as float32 [N, 1, R, W] in [-1, 1], labels as int64 [N]."""
    images = _images(directory, f"{prefix}-images-idx3-ubyte")
    labels = _labels(directory, f"{prefix}-labels-idx1-ubyte")
    if len(images) != len(labels):
        sys.exit(f"{prefix}: {len(images)} images but {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# --------------------------------------------------------------- models


class BlockNet(nn.Module):
    """Conv kernel = stride = B (1 -> C), ReLU, flatten channel-major, Linear, ReLU, Linear."""

    def __init__(self, block=4, channels=32, hidden=256, classes=10, side=28, planes=1):
        super().__init__()
        self.conv = nn.Conv2d(planes, channels, kernel_size=block, stride=block)
        self.fc1 = nn.Linear(channels * (side // block) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = F.relu(self.conv(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class Cnn(nn.Module):
    """conv3x3 p1 -> ReLU -> maxpool2 -> conv3x3 p1 -> ReLU -> maxpool2 -> Linear -> ReLU -> Linear."""

    def __init__(self, c1=16, c2=32, hidden=128, classes=10, side=28, planes=1):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * (side // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        h = self.heads
        qkv = self.qkv(x).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as greyfed


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Vit(nn.Module):
    """Patches P x P (plane, row, col order), linear embedding + learned
    position embedding (no class token), pre-norm blocks, final norm, mean
    over tokens, linear head (greyfed's vit_28x28 defaults)."""

    def __init__(self, patch=4, dim=64, depth=2, heads=4, mlp_dim=128, classes=10, side=28, planes=1):
        super().__init__()
        self.patch, self.grid = patch, side // patch
        self.patch_embed = nn.Linear(planes * patch * patch, dim)
        self.pos_embed = nn.Parameter(torch.empty(self.grid * self.grid, dim).uniform_(-0.02, 0.02))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        n, i, _, _ = x.shape
        g, p = self.grid, self.patch
        x = x.reshape(n, i, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, i * p * p)
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim, token_mlp_dim, channel_mlp_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.token_mlp = Mlp(tokens, token_mlp_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.channel_mlp = Mlp(dim, channel_mlp_dim)

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """Patches P x P (plane, row, col order), linear embedding, pre-norm
    mixer blocks (token MLP across the patches, channel MLP per patch),
    final norm, mean over tokens, linear head (greyfed's mixer_28x28
    defaults)."""

    def __init__(self, patch=4, dim=128, depth=6, token_mlp_dim=196, channel_mlp_dim=512,
                 classes=10, side=28, planes=1):
        super().__init__()
        self.patch, self.grid = patch, side // patch
        tokens = self.grid * self.grid
        self.patch_embed = nn.Linear(planes * patch * patch, dim)
        self.blocks = nn.ModuleList(
            MixerBlock(tokens, dim, token_mlp_dim, channel_mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        n, i, _, _ = x.shape
        g, p = self.grid, self.patch
        x = x.reshape(n, i, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, i * p * p)
        x = self.patch_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


class GridCnn(nn.Module):
    """Patches P x P (plane, row, col order), linear embedding, one dense
    token map from the patches onto the grid (shared by the channels),
    GELU, two 3x3 convolutions with GELU, 2x2 max-pooling, a third 3x3
    convolution with GELU, mean over the grid, linear head (greyfed's
    gridcnn_28x28 defaults)."""

    def __init__(self, patch=4, dim=64, channels=(64, 64, 128), classes=10, side=28, planes=1):
        super().__init__()
        self.patch, self.grid = patch, side // patch
        tokens = self.grid * self.grid
        self.patch_embed = nn.Linear(planes * patch * patch, dim)
        self.token_map = nn.Linear(tokens, tokens)
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(dim, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.head = nn.Linear(c3, classes)

    def forward(self, x):
        n, i, _, _ = x.shape
        g, p = self.grid, self.patch
        x = x.reshape(n, i, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, i * p * p)
        x = self.patch_embed(x).transpose(1, 2)  # N, D, T
        x = F.gelu(self.token_map(x)).reshape(n, -1, g, g)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        x = F.gelu(self.conv3(F.max_pool2d(x, 2)))
        return self.head(x.mean((2, 3)))


MODELS = {"blocknet": BlockNet, "cnn": Cnn, "vit": Vit, "mixer": Mixer, "gridcnn": GridCnn}


# ------------------------------------------------------------- training


def train(model, x, y, epochs, lr, generator):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(y)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, x, y, batch=500):
    model.eval()
    correct = 0
    for start in range(0, len(y), batch):
        logits = model(x[start : start + batch])
        correct += (logits.argmax(1) == y[start : start + batch]).sum().item()
    return correct / len(y)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="blocknet")
    ap.add_argument("--data", required=True, help="IDX dataset directory (MNIST layout)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-batches", type=int, default=10)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)

    x_train, y_train = load_split(args.data, "train")
    x_test, y_test = load_split(args.data, "t10k")
    side = x_train.shape[-1]
    if x_train.shape[-2] != side:
        sys.exit("only square images are supported")
    model = MODELS[args.model](side=side)

    if args.warmup_batches > 0:
        k = min(args.warmup_batches * BATCH_SIZE, len(y_train))
        train(copy.deepcopy(model), x_train[:k], y_train[:k], 1, args.lr, torch.Generator().manual_seed(args.seed))

    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    last_loss = train(model, x_train, y_train, args.epochs, args.lr, gen)
    secs = time.perf_counter() - start

    accuracy = evaluate(model, x_test, y_test)
    print(
        f"pytorch {args.model}: {len(y_train)} train / {len(y_test)} test images, {args.epochs} epochs "
        f"in {secs:.3f} s, last batch loss {last_loss:.4f}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        file=sys.stderr,
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    print(f"images_per_sec={len(y_train) * args.epochs / secs:.1f} accuracy={accuracy:.4f} peak_rss_mb={peak_mb:.1f}")


if __name__ == "__main__":
    main()
