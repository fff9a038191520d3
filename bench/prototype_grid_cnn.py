"""Prototype for issue 20 (PyTorch, plain images; not used by greyfed).

Patch embedding (4x4 blocks) -> one learned dense token map from the 49 blocks to
a 7x7 grid -> 3x3 convolutions -> pool -> linear. The token map absorbs a block
permutation as a permutation of its columns and the embedding absorbs in-block
transforms, so with an i.i.d. initialisation training on encrypted images is
training on plain ones in distribution; `identity` starts the token map at the
identity, which on encrypted images means a key-transformed start (it shows the
coordinator the block permutation).

    python bench/prototype_grid_cnn.py random|identity EPOCHS [DATA_DIR]

Environment: LS (label smoothing, default 0.1), SCHED (onecycle, default, or
warmcos: greyfed's 5% linear warm-up then cosine, peak 2e-3).
"""
import os, sys, time, math, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_train import load_split

class GridCnn(nn.Module):
    def __init__(s, b=4, d=64, identity=False):
        super().__init__()
        s.embed = nn.Conv2d(1, d, b, stride=b)
        s.tokens = nn.Linear(49, 49)
        if identity:
            with torch.no_grad():
                s.tokens.weight.copy_(torch.eye(49)); s.tokens.bias.zero_()
        s.c1 = nn.Conv2d(d, 64, 3, padding=1); s.c2 = nn.Conv2d(64, 64, 3, padding=1)
        s.c3 = nn.Conv2d(64, 128, 3, padding=1)
        s.fc = nn.Linear(128, 10)
    def forward(s, x):
        z = s.embed(x)                      # N, d, 7, 7
        n, d = z.shape[:2]
        z = s.tokens(z.reshape(n, d, 49)).reshape(n, d, 7, 7)
        z = F.gelu(s.c1(F.gelu(z)))
        z = F.gelu(s.c2(z))
        z = F.max_pool2d(z, 2)              # 3x3
        z = F.gelu(s.c3(z))
        return s.fc(z.mean((2, 3)))

def affine(x, g):
    n = x.shape[0]
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(10)
    sc = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.1
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 / 14)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1

def run(identity, epochs, data, seed=0):
    torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
    xtr, ytr = load_split(data, "train")
    xte, yte = load_split(data, "t10k")
    m = GridCnn(identity=identity)
    opt = torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=0.05)
    steps = epochs * math.ceil(len(xtr) / 64)
    ls = float(os.environ.get("LS", "0.1"))
    if os.environ.get("SCHED", "onecycle") == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    else:  # greyfed's warm-up cosine: 5% linear warm-up to 2e-3, cosine to 0
        warm = max(1, int(0.05 * steps))
        f = lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))
        for grp in opt.param_groups: grp["lr"] = 2e-3
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    t0 = time.time()
    for e in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        m.train()
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(m(affine(xtr[idx], g)), ytr[idx], label_smoothing=ls)
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        m.eval()
        with torch.no_grad():
            acc = (m(xte).argmax(1) == yte).float().mean().item()
        print(f"identity={identity} epoch {e+1}: test {acc*100:.2f}% ({time.time()-t0:.0f}s)", flush=True)
    print("params", sum(p.numel() for p in m.parameters()), "train", len(xtr), "test", len(xte))

if __name__ == "__main__":
    torch.set_num_threads(1)
    data = sys.argv[3] if len(sys.argv) > 3 else "../shared/data/mnist-10k"
    run(sys.argv[1] == "identity", int(sys.argv[2]), data)
