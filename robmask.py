"""robmask.py: Adversarial Masking and RobMask in one readable file.

A reference implementation of "Adversarial Masking: Towards Understanding Robustness Trade-off for
Generalization" (RobMask). The paper is the spec; read this file top to bottom and you meet it in order:

  §2  Preliminaries ...... PGD, the inner maximisation of adversarial training (pgd); batch norm split into
                           normalisation and rescaling, with k bases for the rescaling (MaskedBatchNorm2d)
  §3  Adversarial masking . fine-tune only BN to move along the clean/robust trade-off (BN_PARTS), and mix two
                           maskings with a slider: the layer with k=2 and u=[1-p, p]
  §4  RobMask ............ methods as branch lists (METHODS), Algorithm 1 quoted and implemented (method_loss)
  §5  Experiments ........ models, data, the training loop, eval (PGD-100, AutoAttack), bench, plots, report
  then the plumbing (checkpoint files, run folders, the command line), which a reader may skip.

Where the paper lives in the code (one home per symbol):
  W, W'   MaskedBatchNorm2d.W and .Wp: k rows of γ bases and β bases
  u       MaskedBatchNorm2d.u, set for a whole model by set_mask(); computed by encode()
  γ, β    computed in MaskedBatchNorm2d.forward as Σ_j u_j w_j and Σ_j u_j w'_j
  ε_i     a branch's strength × eps_max, in method_loss() (Algorithm 1, line 4)
  p       drawn once per mini-batch in method_loss() (Algorithm 1, line 3), from train_epoch's seeded generator
  ε_max, PGD steps, α, k, the schedule: the paper's constants, in one block below the imports

Speed and scale (details where they are used):
  * CIFAR-sized data lives on the device as uint8, cropped and flipped there (DeviceData); ImageNet: DataLoader.
  * The attack computes no weight gradient (pgd) and updates one x_adv in place; the clean branch is never attacked.
  * One backward per step for all branches (BranchLoss), so DDP sees one forward and one backward.
  * --amp (bf16), --channels-last, --compile (one whole-network graph per mode); torchrun: a slice of the global batch each.
  * On CUDA: no host sync inside a steady training step (the epoch's random numbers move once, u is built on the
    device, the loss is checked every FINITE_EVERY steps); cudnn.benchmark and TF32. Tested under fake CUDA tensors.

Evidence (results/ holds the logs and commands): a RobMask step costs AdvProp's (bench: 1.007 on 2 CPU cores, 0.980
on an H200); the CPU studies stats, split and regime (all 27 runs, and extra seeds) are re-run on the network fixed in issue 29.

Usage:  python robmask.py train --dataset cifar10 --arch preactresnet18 --method robmask
        python robmask.py eval runs/x/checkpoint.pt --attack pgd --eps 0,8/255 --mask matched   (and --help)"""
import argparse, contextlib, copy, functools, gc, hashlib, itertools, json, math, os  # noqa: E401
import pickle, re, signal, stat, sys, tempfile, threading, time  # noqa: E401
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

FORMAT, OLD_FORMAT = "robmask/2", "robmask/1"  # written into every checkpoint; anything else is refused as foreign
REBUILT = ("preactresnet18", "resnext29")  # their robmask/1 checkpoints hold the networks before issue 29

class UserError(Exception): """A problem with what the user asked for: main() prints one line and exits 2, no traceback."""

def die(msg): raise UserError(msg)
def log(*a, **kw):  # print on rank 0 only, so that torchrun jobs don't print every line N times
    if not dist.is_initialized() or dist.get_rank() == 0: print(*a, **kw, flush=True)
def warn(msg): log(f"robmask: warning: {msg}", file=sys.stderr)

# The paper's constants (§5), one home each: the parser, method_loss and bench read them from here.
EPS_MAX = 8 / 255  # ε_max: the largest perturbation strength trained on (§4, §5), in pixel units of [0,1] images
ATTACK_STEPS = 7  # PGD steps of the training attack (§5)
ALPHA_DIV = 5  # PGD step size α = ε/5 (§5)
K = 2  # RobMask's number of bases W, W' (§5: "we set k = 2 and ε_max = 8/255")
LR, MOMENTUM, WD, BATCH, EPOCHS = 0.1, 0.9, 5e-4, 128, 100  # SGD with a cosine schedule (§5); 100 epochs (Table 3)
ARCH, WIDTH = "preactresnet18", 64  # §5's "Preact ResNet (He et al., 2016b)": 11,172,170 parameters (k=1, 10 classes)
BN_STATS, DEFAULT_BN_STATS = ("mixed", "split", "shared"), "mixed"  # not in the paper: see MaskedBatchNorm2d

# ==== §2  Preliminaries: adversarial training and batch normalisation ===============================================
# Adversarial training (Madry et al.) solves  min_θ Σ_i max_{x'∈B∞(x_i,ε)} ℓ(f_θ(x'), y_i).
# The inner max has no closed form for a deep net; PGD approximates it with m signed-gradient
# steps of size α, each followed by a projection back onto the ε-ball (and onto [0,1], since the
# models here take pixels in [0,1]: the dataset mean/std live inside the model, see Normalize).
@torch.enable_grad()  # the attack needs ∂ℓ/∂x, even when called under no_grad
def pgd(model, x, y, eps, alpha=None, steps=ATTACK_STEPS, check=True):
    """L∞ untargeted PGD with a uniform random start: x_adv with |x_adv-x|∞ ≤ ε, in [0,1], on the model as set (mask u,
    BN mode). alpha: ε/5 by default (§5). No weight gradient: ∂ℓ/∂x only, a quarter less time than loss.backward()
    (measured). check: refuse images outside [0,1] (it reads them on the host; the training loops skip it)."""
    if check: check_pixels(x)
    if eps == 0 or steps == 0: return x
    alpha = eps / ALPHA_DIV if alpha is None else alpha
    lo, hi = (x - eps).clamp_(min=0), (x + eps).clamp_(max=1)  # the feasible box: ε-ball ∩ [0,1]
    x_adv = torch.empty_like(x).uniform_(-eps, eps).add_(x).clamp_(lo, hi).requires_grad_(True)
    weights = [w for w in model.parameters() if w.requires_grad]
    for w in weights: w.requires_grad_(False)
    try:
        for _ in range(steps):
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv).float(), y, reduction="sum"), x_adv)
            with torch.no_grad():  # step along the sign, then project: in place, the one buffer
                x_adv.add_(grad.sign(), alpha=alpha).clamp_(lo, hi)
    finally:
        for w in weights: w.requires_grad_(True)
    return x_adv.detach()

def check_pixels(x):
    if not (torch.is_tensor(x) and x.is_floating_point()):
        raise TypeError(f"images must be a float tensor of pixels in [0,1], not {type(x).__name__}")
    if not bool((x.min() >= 0) & (x.max() <= 1)):
        raise ValueError(f"images must be pixels in [0,1] (the model normalises them itself; see Normalize), but they "
                         f"span [{x.min().item():.3g}, {x.max().item():.3g}]: pass unnormalised images")

# Batch normalisation (Ioffe & Szegedy), §2:  O = γ·(I - μ)/sqrt(σ² + eps) + β, per channel. The paper splits it
# into *normalisation* (μ, σ²: the batch's in training, running averages at test time) and *rescaling* (γ, β).
# §3.1 finds that fine-tuning only BN moves a model along the clean/robust trade-off, through γ (not μ, σ²):
# rescaling followed by ReLU zeroes some channels and magnifies others, a *mask*. §3.2 mixes two maskings,
# (1-p)(γ, β) + p(γ', β'); §4 generalises: with an encoding u ∈ R^k of the perturbation strength and k learnt
# bases, γ = Σ_j u_j w_j and β = Σ_j u_j w'_j, i.e. γ = u W, β = u W' (W, W': k × C). One layer serves every method:
#   k=1, u=[1]            is nn.BatchNorm2d (standard training and Madry adversarial training)
#   k=2, u∈{e1,e2}        is AdvProp's dual BN: two independent BatchNorm2d
#   k=3, u one-hot        is the multi-BN ablation of Table 7
#   k=2, u=[1-p, p]       is §3.2's slider, and RobMask
#
# The encoding (§4): a strength p = ε/ε_max becomes u ∈ R^k by "hat" functions over k evenly spaced anchors
# a_j = j/(k-1) in [0,1]: u_j = max(0, 1 - (k-1)|p - a_j|). For k=2 that is the paper's u = (1-p)·u_0 + p·u_max
# = [1-p, p]. AdvProp-style methods keep their BNs separate ("onehot"): the clean BN at p=0, else the
# adversarial basis whose anchor is nearest to p. A layer starts at u(0), the clean mask.
def encode(p, k, onehot=False, device=None):
    """u(p) ∈ R^k, built on `device` by kernels that take p as a number: no copy from the host, no wait."""
    if k == 1: return torch.ones(1, device=device)
    p = min(max(float(p), 0.0), 1.0)  # strengths beyond ε_max use the ε_max mask
    if onehot:
        j = 0 if p == 0 else 1 + int(torch.argmin((torch.linspace(0, 1, k)[1:] - p).abs()))  # on the host
        return (torch.arange(k, device=device) == j).float()
    anchors = torch.linspace(0, 1, k, device=device)
    return (1 - (p - anchors).abs() * (k - 1)).clamp(min=0)

# The paper masks only the rescaling and leaves the running statistics (μ, σ²) open. The layer offers three
# readings (--bn-stats), because the choice biases exactly the paper's headline metric, clean accuracy at u(0):
#   mixed : every basis j keeps its own statistics, moved by momentum·u_j; evaluation mixes them by u.
#           Flaw: RobMask's adversarial branch at u=[1-p, p] also moves the *clean* basis, by (1-p).
#   split : the clean branch (ε=0) alone moves the clean basis (row 0); an adversarial branch moves only
#           the adversarial bases, by its u_j renormalised over them. Evaluation mixes by u.
#   shared: one set of statistics for all bases, moved by every branch: only γ, β depend on u, the
#           paper's literal reading ("normalisation only has marginal influence").
# Under mixed and split AdvProp (one-hot u) is untouched, and "AdvProp is RobMask with k=2 and p frozen
# at 1" holds bit for bit (tested). The default, mixed, was decided by measurement (results/stats-cpu/STUDY.md): the
# best clean accuracy at u(0) over 3 seeds (split 0.1 behind, shared 2.5), and AdvProp keeps its own two sets.
class MaskedBatchNorm2d(nn.Module):
    """BatchNorm2d with k bases for the affine rescaling: W (k×C) holds the γ bases w_j, Wp (k×C) the β bases w'_j (the
    paper's W'). Buffers: running_mean, running_var (k×C, or 1×C for --bn-stats shared); u (k,), the current encoding.
    set_mask() gives every layer u and whether the batch is adversarial before a forward (neither is saved); the
    `stats` rule decides how far each row of statistics moves. bn_eps: BatchNorm2d's variance floor (not an attack's ε)."""
    def __init__(self, num_features, k=1, bn_eps=1e-5, momentum=0.1, stats=DEFAULT_BN_STATS):
        super().__init__()
        self.num_features, self.k, self.bn_eps, self.momentum, self.stats = num_features, k, bn_eps, momentum, stats
        rows = 1 if stats == "shared" else k
        self.W = nn.Parameter(torch.ones(k, num_features))  # γ bases, initialised like BN's γ=1
        self.Wp = nn.Parameter(torch.zeros(k, num_features))  # β bases (W'), like BN's β=0
        self.register_buffer("running_mean", torch.zeros(rows, num_features))
        self.register_buffer("running_var", torch.ones(rows, num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("u", encode(0.0, k), persistent=False)
        self.adversarial = False  # is the batch of the next training forward adversarial (ε > 0)?
        self.update_stats = True  # False: normalise with batch stats but leave running stats alone

    @staticmethod
    def stat_weights(u, stats, adversarial):
        """How far each row of running statistics moves toward a training batch's statistics (× momentum)."""
        if stats == "shared": return torch.ones(1, device=u.device)
        if stats == "split" and len(u) > 1:
            if not adversarial:  # the clean branch moves the clean basis (row 0) alone
                return (torch.arange(len(u), device=u.device) == 0).float()
            w = torch.cat([u.new_zeros(1), u[1:]])  # an adversarial branch: its u over the adversarial rows
            return w / w.sum()
        return u

    def mix(self, bases):
        """Σ_j u_j · bases[j]: γ from W, β from W', μ and σ² in evaluation; elementwise, so autocast keeps it in fp32."""
        return (self.u[:, None] * bases).sum(0)

    def eval_stats(self):
        """(μ, σ²) for evaluation: one set of statistics (shared) as it is, else the u-mixture of the rows."""
        if self.stats == "shared": return self.running_mean[0], self.running_var[0]
        return self.mix(self.running_mean), self.mix(self.running_var)

    def forward(self, x):
        gamma = self.mix(self.W)  # γ = Σ_j u_j w_j   (Algorithm 1, line 11)
        beta = self.mix(self.Wp)  # β = Σ_j u_j w'_j  (Algorithm 1, line 11)
        if not self.training: return F.batch_norm(x, *self.eval_stats(), gamma, beta, False, 0.0, self.bn_eps)
        if not self.update_stats:  # e.g. a PGD attack in train-BN mode: batch stats, no update
            return F.batch_norm(x, None, None, gamma, beta, True, 0.0, self.bn_eps)
        # Training: normalise with the batch statistics. With momentum=1 the kernel writes the batch
        # mean and unbiased variance into these two scratch tensors, so we get them without a second
        # pass over x; each row then moves toward them by momentum·stat_weights_j. With k=1, u=[1] that is
        # exactly BatchNorm2d's update (up to float rounding: PyTorch mixes in double on the CPU).
        batch_mean = torch.zeros(self.num_features, device=x.device, dtype=self.running_mean.dtype)
        batch_var = torch.zeros_like(batch_mean)
        out = F.batch_norm(x, batch_mean, batch_var, gamma, beta, True, 1.0, self.bn_eps)
        with torch.no_grad():
            w = self.momentum * self.stat_weights(self.u, self.stats, self.adversarial)[:, None]  # weight 0: stays put
            self.running_mean.mul_(1 - w).add_(w * batch_mean)
            self.running_var.mul_(1 - w).add_(w * batch_var)
            self.num_batches_tracked.add_(1)
        return out

    def extra_repr(self): return f"{self.num_features}, k={self.k}, bn_eps={self.bn_eps}, momentum={self.momentum}, stats={self.stats}"

def convert_masked_bn(module, k=1, stats=DEFAULT_BN_STATS):
    """Swap every nn.BatchNorm2d in `module` for a MaskedBatchNorm2d with k bases, each a copy of its γ, β and running
    stats (like SyncBatchNorm.convert_sync_batchnorm): models are written with BatchNorm2d, this makes any method's."""
    if stats not in BN_STATS or not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"convert_masked_bn needs an integer k >= 1 and stats in {BN_STATS}, not k={k!r}, stats={stats!r}")
    if isinstance(module, nn.BatchNorm2d):
        if not (module.affine and module.track_running_stats) or module.momentum is None:
            raise ValueError("convert_masked_bn needs BatchNorm2d(affine=True, track_running_stats=True, momentum=float)")
        new = MaskedBatchNorm2d(module.num_features, k, module.eps, module.momentum, stats)
        with torch.no_grad():  # every basis starts as the BatchNorm2d it replaces
            for mine, theirs in ((new.W, module.weight), (new.Wp, module.bias), (new.running_mean, module.running_mean),
                                 (new.running_var, module.running_var), (new.num_batches_tracked, module.num_batches_tracked)):
                mine.copy_(theirs.expand_as(mine))
        return new if new.W.device == module.weight.device else new.to(module.weight.device)
    for name, child in module.named_children(): module.add_module(name, convert_masked_bn(child, k, stats))
    return module

def masked_layers(model, required=False):
    layers = [m for m in model.modules() if isinstance(m, MaskedBatchNorm2d)]
    if required and not layers:
        raise ValueError("the model has no masked BN layer (MaskedBatchNorm2d): call convert_masked_bn(model, k=...) "
                         "on a model with nn.BatchNorm2d first")
    return layers

def num_bases(model): return masked_layers(model, required=True)[0].k

def set_mask(model, u, adversarial=False):
    """Give every masked BN layer of `model` the encoding u (length k) for the next forward, and whether the batch is
    adversarial (ε > 0; for the --bn-stats rule). u is rebound, never written in place: a branch's forward saves its u
    for the backward, and the next branch must not overwrite it before the step's single backward (BranchLoss)."""
    layers = masked_layers(model, required=True)
    u = torch.as_tensor(u, dtype=torch.float32).to(layers[0].W.device)
    if u.shape != (layers[0].k,): raise ValueError(f"mask u has shape {tuple(u.shape)}, the model has k={layers[0].k} bases")
    for m in layers: m.u, m.adversarial = u, adversarial

@contextlib.contextmanager
def kept(model):
    """Leaves `model` as it was found, also when the body raises: every module's train/eval mode (a caller's frozen BN
    stays frozen), each masked layer's u (rebound, never written in place), adversarial flag and update_stats."""
    modes, layers = [(m, m.training) for m in model.modules()], masked_layers(model)
    saved = [(m.u, m.adversarial, m.update_stats) for m in layers]
    try: yield layers
    finally:
        for m, training in modes: m.training = training
        for m, (u, adversarial, update) in zip(layers, saved): m.u, m.adversarial, m.update_stats = u, adversarial, update

@contextlib.contextmanager
def attack_bn_mode(model, mode):
    """BN while PGD runs inside a training step (--attack-bn): 'eval' uses the running statistics (as TRADES, OAT and
    most AdvProp ports do); 'train' the batch statistics, leaving the running ones untouched."""
    with kept(model) as layers:
        if mode == "eval": model.eval()
        for m in layers: m.update_stats = False
        yield

# ==== §3  Adversarial masking: the analysis tools ===================================================================
# §3.1: fine-tune only BN (everything else frozen) of a standard model on adversarial examples, or
# of an adversarially trained model on clean images, and the model moves along the clean/robust
# trade-off. Which parts of BN are allowed to move (--params of finetune-bn):
BN_PARTS = {
    "affine": ("W", "Wp"),  # γ and β (running stats are re-estimated too, as in any BN training)
    "gamma": ("W",),  # γ only: the rescaling that §3.1 finds responsible
    "beta": ("Wp",),  # β only
    "stats": (),  # no gradient step at all: only the running mean/var are re-estimated
}

def trainable_parameters(model, bn_params=None):
    """All parameters, or (for finetune-bn) only the chosen parts of the masked BN layers. The rest
    get requires_grad=False, so they get no gradient, no weight decay and stay bitwise unchanged."""
    if bn_params is None: return list(model.parameters())
    for w in model.parameters(): w.requires_grad_(False)
    chosen = [getattr(m, name) for m in masked_layers(model) for name in BN_PARTS[bn_params]]
    for w in chosen: w.requires_grad_(True)
    return chosen

# §3.2: with two maskings (γ, β) and (γ', β'), the combination (1-p)(γ, β) + p(γ', β') gives a model per p, a
# trade-off slider without retraining. That is exactly the masked layer with k=2 and u = encode(p, 2) = [1-p, p]:
# stacking two models' BN layers as its two bases gives the slider (the `tradeoff` command does, in §5).

# ==== §4  RobMask ===================================================================================================
# Methods as data. One training step of any method is a list of branches; a branch is a strength
# (ε/ε_max, or "p", drawn per mini-batch) with the mask u = encode(strength). The step attacks each
# branch with its own mask, forwards it, sums the mean CE losses and takes one SGD step.
#   name              k     encoding   branch strengths
METHODS = {
    "bn": (1, "hat", (0,)),  # standard training
    "adv": (1, "hat", (1,)),  # Madry PGD training
    "advprop": (2, "onehot", (0, 1)),  # Xie et al. 2020: clean BN + auxiliary adversarial BN
    "advprop-random": (2, "onehot", (0, "p")),  # Table 7: the auxiliary BN sees a random strength
    "advprop-multi": (3, "onehot", (0, 0.5, 1)),  # Table 7: one more auxiliary BN, at ε_max/2
    "robmask": (None, "hat", (0, "p")),  # §4: k from --k; --robmask-adv-only drops the clean branch
}
# Why RobMask keeps a clean branch that the literal Algorithm 1 lacks: §5 times RobMask against AdvProp as "two
# forward and one backward pass" per step each (Timing), which is AdvProp's clean + adversarial step. The clean
# branch (ε=0, u(0)) is also what trains the clean mask that the headline metric, clean accuracy at u(0), uses.
# --robmask-adv-only gives Algorithm 1 as written.

def method_k(method, k=None): return METHODS[method][0] or k or K  # the bases k that `method` needs (robmask: k, or K)
def mask_for(method, p, k=None, device=None):  # the encoding u(p) that `method` uses for strength p = ε/ε_max
    return encode(p, method_k(method, k), METHODS[method][1] == "onehot", device)
def branch_strengths(method, adv_only=False):  # adv_only: Algorithm 1 read literally
    return ("p",) if method == "robmask" and adv_only else METHODS[method][2]
def branches(method, p, k=None, adv_only=False, device=None):
    """[(ε_i/ε_max, u_i), ...] for one mini-batch with the drawn p (Algorithm 1, lines 4-5)."""
    strengths = (p if s == "p" else s for s in branch_strengths(method, adv_only))
    return [(s, mask_for(method, s, k, device)) for s in strengths]

class BranchLoss(nn.Module):
    """Σ_i mean CE(f(x_i; γ(u_i), β(u_i)), y) over a step's branches, in a single forward. DDP wraps this, not the network:
    it sees one forward and one backward per step, each gradient summed over the branches before its all-reduce."""
    def __init__(self, net, amp=contextlib.nullcontext):
        super().__init__()
        self.net, self.amp = net, amp
    def forward(self, xs, us, advs, y):
        loss, ces, hits = 0.0, [], None
        for x, u, adv in zip(xs, us, advs):
            set_mask(self.net, u, adversarial=adv)
            with self.amp(): logits = self.net(x)
            ce = F.cross_entropy(logits.float(), y)
            loss = loss + ce  # summed in branch order, as the published runs did
            ces.append(ce.detach())
            if not adv and hits is None:  # the clean branch's correct count: the training accuracy
                hits = (logits.detach().argmax(1) == y).sum()
        # For the log, kept on the device (reading them here would make the host wait every step):
        # each branch's own CE, and the clean branch's hits (None for a method without a clean branch)
        self.last = (torch.stack(ces), hits)
        return loss

def check_method_args(method, p, eps_max, attack_steps, attack_bn, k):
    """method_loss's arguments, as the CLI's parser would check them: a ValueError naming the first bad one."""
    count = lambda v, lo: isinstance(v, int) and not isinstance(v, bool) and v >= lo  # noqa: E731
    unit = lambda v: isinstance(v, (int, float)) and 0 <= v <= 1  # noqa: E731
    for name, value, ok, want in [
            ("method", method, method in METHODS, f"choose from {', '.join(METHODS)}"),
            ("p", p, p is None or unit(p), "p = ε/ε_max is a number in [0, 1], or None to draw it (Algorithm 1, line 3)"),
            ("eps_max", eps_max, unit(eps_max), "ε_max is in pixel units of [0,1] images: 8/255, not 8"),
            ("attack_steps", attack_steps, count(attack_steps, 0), "a whole number of PGD steps, 0 or more"),
            ("attack_bn", attack_bn, attack_bn in ("eval", "train"), "'eval' or 'train'"),
            ("k", k, k is None or count(k, 1), "an integer >= 1, or None")]:
        if not ok: raise ValueError(f"method_loss: {name}={value!r}; {want}")

# Algorithm 1 of the paper ("The proposed RobMask method for improving model generalization"), numbered here;
# "line N" anywhere in this file means this numbering.
#    Input: training dataset {x_i, y_i}, i = 1..n, perturbation upper bound ε_max
#     1  for epoch = 1, ..., N do
#     2    for i = 1, ..., B do
#     3      sample a random number p from 0 to 1
#     4      ε_i ← p · ε_max                        # the current perturbation strength in this mini-batch
#     5      u_i ← Encode(ε_i)                      # encode the perturbation strength as a vector
#     6      δ_i ← 0
#     7      for j = 1, ..., m do
#     8        δ_i ← δ_i + α · sign(∇_δ ℓ(f_θ(x_i + δ_i), y_i))      # PGD adversarial attack
#     9        δ_i ← max(min(δ_i, ε_i), -ε_i)
#    10      end for
#    11      γ_i ← Σ_j u_ij w_j,  β_i ← Σ_j u_ij w'_j                # the rescaling parameters in BN
#    12      W ← W - η_1 ∇_W ℓ(f_θ(x_i + δ_i, γ_i, β_i), y_i)       # update W and W'
#    13      W' ← W' - η_2 ∇_W' ℓ(f_θ(x_i + δ_i, γ_i, β_i), y_i)
#    14      θ ← θ - η_3 ∇_θ ℓ(f_θ(x_i + δ_i, γ_i, β_i), y_i)       # update the network parameters θ
#    15    end for
#    16  end for
#    17  return θ, W, W'
# Here: lines 3-11 are method_loss, generalised to a list of branches (METHODS: RobMask adds the clean branch, ε=0,
# u_0, and the loss is the sum over branches); lines 12-14 are train_step's one backward and SGD step (η_1 = η_2 =
# η_3, §5). PGD starts from a uniform random δ (§5: "with random initialization"), and also projects onto [0,1].
def method_loss(model, x, y, method="robmask", p=None, eps_max=EPS_MAX, attack_steps=ATTACK_STEPS, attack_bn="eval",
                k=None, fix_p=None, adv_only=False, freeze_stats=False, amp=contextlib.nullcontext,
                loss_module=None, generator=None, check=True):
    """The library API: a step's summed loss of `method` on a batch, attacks included (Algorithm 1, lines 3-11), for any
    model that went through convert_masked_bn (k bases). Call .backward() and step your optimizer. p: None draws it per
    call (line 3); fix_p freezes it (--fix-p); adv_only drops RobMask's clean branch. freeze_stats: BN normalises with its
    running statistics (finetune-bn --freeze-stats). loss_module: BranchLoss(model), possibly inside DDP. generator:
    where p is drawn from. check=False skips the argument checks (the CLI made them; reading the images would wait)."""
    if check:
        check_method_args(method, p, eps_max, attack_steps, attack_bn, k)
        check_pixels(x)
    if num_bases(model) != method_k(method, k):
        raise ValueError(f"the model has k={num_bases(model)} bases but {method} needs {method_k(method, k)}: "
                         f"convert_masked_bn(model, k={method_k(method, k)})")
    with kept(model) as layers:  # the caller gets its model back as it gave it: modes and mask
        if p is None:  # line 3: p ~ U(0,1) once per mini-batch (or frozen by --fix-p)
            draws = "p" in METHODS[method][2] and fix_p is None
            p = torch.rand((), generator=generator, device="cpu").item() if draws else fix_p
        xs, us, advs = [], [], []
        for strength, u in branches(method, p, k, adv_only, layers[0].W.device):  # line 5: u_i
            eps_i = strength * eps_max  # line 4: ε_i ← p·ε_max
            if eps_i > 0:  # lines 6-10, with the branch's own mask; the clean branch (ε=0) is never attacked
                set_mask(model, u)
                with attack_bn_mode(model, attack_bn), amp():
                    x_i = pgd(model, x, y, eps_i, eps_i / ALPHA_DIV, attack_steps, check=False)
            else: x_i = x
            xs.append(x_i); us.append(u); advs.append(eps_i > 0)
        if freeze_stats:  # finetune-bn --freeze-stats: normalise with the running stats
            for m in layers: m.eval()
        return (loss_module or BranchLoss(model, amp))(xs, us, advs, y)  # line 11 (inside each forward) and the loss

def train_step(net, loss_module, opt, x, y, amp=contextlib.nullcontext, generator=None, **method):
    """One iteration of Algorithm 1 for any method (keywords of method_loss): returns the summed loss (a 0-d tensor)."""
    if opt is None:  # finetune-bn --params stats: forward only, to re-estimate the running stats
        with torch.no_grad():
            return method_loss(net, x, y, amp=amp, loss_module=loss_module, generator=generator, check=False, **method)
    loss = method_loss(net, x, y, amp=amp, loss_module=loss_module, generator=generator, check=False, **method)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # lines 12-14: one backward for all branches, W, W' and θ updated together
    opt.step()
    return loss.detach()

# ==== §5  Experiments ===============================================================================================
# ---- 5.1 Models ------------------------------------------------------------------------------
# Each CIFAR model follows the paper that §5 cites for it (named beside it), with two CIFAR habits: a 3x3 stem
# without max-pooling (32x32 images), and PyTorch's default initialisation. Written with plain nn.BatchNorm2d;
# build_model() converts them. --width scales the base channel count (64 in the paper), for CPU-sized runs.
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
            "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}

class Normalize(nn.Module):
    """The model's first layer: (x - mean)/std. Images and attacks live in [0,1] pixel space."""
    def __init__(self, mean, std):
        super().__init__()
        for name, v in (("mean", mean), ("std", std)): self.register_buffer(name, torch.tensor(v).view(1, 3, 1, 1), persistent=False)
    def forward(self, x): return (x - self.mean) / self.std

class Network(nn.Sequential):
    """nn.Sequential with a forward of our own: torch.compile (torch 2.11) skips torch.nn's frames and would compile each
    block as a graph of its own, per width and mode; this way the whole network is one graph (tested on 2.11 and 2.14)."""
    def forward(self, x):
        for layer in self: x = layer(x)
        return x

def conv(cin, cout, k=3, stride=1, groups=1): return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)

class PreActBlock(nn.Module):  # He et al. 2016b: BN-ReLU-conv, twice; shortcut from the first BN-ReLU
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv(cin, cout, 3, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv(cout, cout)
        self.shortcut = conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None
    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip

class BasicBlock(nn.Module):  # He et al. 2016a: conv-BN-ReLU-conv-BN, add, ReLU
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))

class ResNeXtBlock(nn.Module):  # Xie et al. 2017: 1x1, grouped 3x3 (cardinality 2), 1x1 to 2x width
    def __init__(self, cin, width, stride, cardinality=2):
        super().__init__()
        cout = 2 * width
        self.conv1, self.bn1 = conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv(width, width, 3, stride, cardinality), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv(width, cout, 1), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))

class DenseLayer(nn.Module):  # Huang et al.: BN-ReLU-1x1(4g)-BN-ReLU-3x3(g), concatenated to the input
    def __init__(self, cin, growth):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv(cin, 4 * growth, 1)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth), conv(4 * growth, growth)
    def forward(self, x): return torch.cat([self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x)))))), x], 1)

class Transition(nn.Sequential):  # BN-ReLU-1x1 conv-2x2 average pool, halving the channels
    def __init__(self, cin, cout): super().__init__(nn.BatchNorm2d(cin), nn.ReLU(), conv(cin, cout, 1), nn.AvgPool2d(2))

def stages(block, cin, widths, depths, expansion=1):
    """Residual stages: the first block of every stage after the first downsamples by 2."""
    layers = []
    for i, (w, n) in enumerate(zip(widths, depths)):
        for b in range(n):
            layers.append(block(cin, w, 2 if i > 0 and b == 0 else 1))
            cin = w * expansion
    return layers, cin

def cifar_body(arch, w):
    """(layers, feature channels) of a CIFAR model at width w; the caller adds pooling and the classifier."""
    if arch == "preactresnet18":  # He et al. 2016b: pre-activation blocks, then BN-ReLU before pooling: no block normalises
        # the residual stream; without it (kuangliu's file) the paper's recipe diverges at width 64 (issue 29)
        layers, c = stages(PreActBlock, w, [w, 2 * w, 4 * w, 8 * w], [2, 2, 2, 2])
        return [conv(3, w)] + layers + [nn.BatchNorm2d(c), nn.ReLU()], c
    if arch == "resnet18":  # He et al. 2016a: post-activation blocks, projection shortcuts (option B)
        layers, c = stages(BasicBlock, w, [w, 2 * w, 4 * w, 8 * w], [2, 2, 2, 2])
        return [conv(3, w), nn.BatchNorm2d(w), nn.ReLU()] + layers, c
    if arch == "resnext29":  # Xie et al. 2017, 2x64d: 3x3 stem (their code), cardinality 2, width 64 doubling per stage
        layers, c = stages(ResNeXtBlock, w, [2 * w, 4 * w, 8 * w], [3, 3, 3], expansion=2)
        return [conv(3, w), nn.BatchNorm2d(w), nn.ReLU()] + layers, c
    if arch == "densenet121":  # Huang et al. 2017: growth 32 at width 64, blocks 6-12-24-16, compression 0.5
        g, c, layers = w // 2, w, [conv(3, w)]
        for i, n in enumerate([6, 12, 24, 16]):
            layers, c = layers + [DenseLayer(c + j * g, g) for j in range(n)], c + n * g
            if i < 3: layers, c = layers + [Transition(c, c // 2)], c // 2
        return layers + [nn.BatchNorm2d(c), nn.ReLU()], c
    raise ValueError(arch)

ARCHS = ("preactresnet18", "resnet18", "resnext29", "densenet121")
MIN_WIDTH, MAX_WIDTH, MAX_K = {"densenet121": 2}, 512, 16  # densenet's growth rate is width/2
ARCH_ALIASES = {"resnext": "resnext29", "resnext29_2x64d": "resnext29", "preactresnet": "preactresnet18"}

def torchvision_archs():
    """torchvision's classification models (resnet50, efficientnet_b0, ...): any of them, for image folders."""
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)

def plain_model(arch, num_classes, width=WIDTH, dataset="cifar10"):
    """Normalize, then `arch` with plain BatchNorm2d: ours for CIFAR, torchvision's (at its own width) for imagenet."""
    mean, std = MEAN_STD.get(dataset, MEAN_STD["cifar10"])
    if dataset == "imagenet":
        import torchvision
        # googlenet and inception_v3 without their auxiliary classifiers: the method has one loss per branch
        aux = dict(aux_logits=False, init_weights=True) if arch in ("googlenet", "inception_v3") else {}
        body = torchvision.models.get_model(arch, num_classes=num_classes, **aux)
    else:
        layers, c = cifar_body(arch, width)
        body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    return Network(Normalize(mean, std), body)

def build_model(arch, num_classes, k=1, width=WIDTH, dataset="cifar10", bn_stats=DEFAULT_BN_STATS):
    """The network for `arch`, with its BN layers as MaskedBatchNorm2d(k, bn_stats) and Normalize first."""
    model = convert_masked_bn(plain_model(ARCH_ALIASES.get(arch, arch), num_classes, width, dataset), k, bn_stats)
    if not masked_layers(model):
        die(f"{arch} has no BatchNorm2d: RobMask masks BN's rescaling (γ, β), so it needs a model with BN "
            "(ViTs and ConvNeXts use LayerNorm)")
    return model

def count_params(model): return sum(w.numel() for w in model.parameters())

# ---- 5.2 Data --------------------------------------------------------------------------------
IMAGE_EXTS = (".png", ".jpg", ".jpeg")

def subset_indices(labels, n):
    """A fixed class-balanced subset of size n (all for n=None or n ≥ len), the same for every seed: the classes visited
    round-robin (class 0's first image, class 1's first, ...), since image folders are sorted by class."""
    labels = torch.as_tensor(labels).long()
    if not n or n >= len(labels): return torch.arange(len(labels))
    nth = torch.zeros_like(labels)  # each image's place within its class
    for c in labels.unique(): nth[labels == c] = torch.arange(int((labels == c).sum()))
    return torch.argsort(nth * (int(labels.max()) + 1) + labels, stable=True)[:n].sort().values

def list_image_folder(root):
    """(paths, labels, classes) of root/<class>/<image>; non-image files are skipped with a warning."""
    if not os.path.isdir(root): die(f"{root} does not exist; an image-folder dataset needs {root}/<class>/<image>.png|jpg")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = [(os.path.join(root, name, f), c) for c, name in enumerate(classes) for f in sorted(os.listdir(os.path.join(root, name)))]
    paths, labels = [p for p, _ in files if p.lower().endswith(IMAGE_EXTS)], [c for p, c in files if p.lower().endswith(IMAGE_EXTS)]
    if skipped := [p for p, _ in files if not p.lower().endswith(IMAGE_EXTS)]:
        warn(f"skipping {len(skipped)} non-image file(s) under {root}, e.g. {skipped[0]}")
    if not paths: die(f"no images found under {root}; expected {root}/<class>/<name>.png or .jpg")
    return paths, torch.tensor(labels), classes

def decode_images(paths, labels):
    """Files to one uint8 tensor (N,3,H,W); an unreadable file is skipped with a warning here, never mid-epoch."""
    import numpy as np
    from PIL import Image
    images, keep = [], []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im: images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
            keep.append(i)
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            warn(f"skipping unreadable image {path} ({str(e).splitlines()[0]})")
    if not images: die(f"none of the {len(paths)} images under {os.path.dirname(os.path.dirname(paths[0]))} could be decoded")
    if len(shapes := {tuple(t.shape) for t in images}) > 1:
        die(f"images of different sizes {sorted(shapes)[:2]} under {os.path.dirname(paths[0])}; the CIFAR "
            "reader needs one size (use --dataset imagenet for resized ImageFolder data)")
    return torch.stack(images), labels[keep]

def synthetic_data(n_train=2560, n_test=512, num_classes=10, size=32):
    """A small learnable dataset for tests and CI, made in memory (fixed seed): per class a smooth colour pattern + noise."""
    g = torch.Generator().manual_seed(1234)
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=size, mode="bilinear")
    def make(n):
        y = torch.arange(n) % num_classes
        x = protos[y] * 0.6 + 0.2 + 0.2 * torch.randn(n, 3, size, size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y
    return (*make(n_train), *make(n_test), [str(c) for c in range(num_classes)])

def cifar_arrays(args):
    """(x_train, y_train, x_test, y_test, classes) as uint8/int64 CPU tensors for cifar10/cifar100."""
    root, sizes = args.data_dir or "data", (args.subset, args.test_n)
    if args.data_dir and not os.path.isdir(root):
        die(f"--data-dir {root} does not exist; point it at CIFAR (torchvision's files or train/ and test/ "
            "class folders), or create it so that torchvision can download CIFAR into it")
    if all(os.path.isdir(os.path.join(root, split)) for split in ("train", "test")):
        listed, out = [list_image_folder(os.path.join(root, split)) for split in ("train", "test")], []
        check_classes(listed[0][2], listed[1][2], root, "test")
        for (paths, labels, _), n in zip(listed, sizes):
            idx = subset_indices(labels, n)  # choose first, decode only what is used
            out += decode_images([paths[i] for i in idx], labels[idx])
        return (*out, listed[0][2])
    import torchvision
    cls, folder = ((torchvision.datasets.CIFAR10, "cifar-10-batches-py") if args.dataset == "cifar10"
                   else (torchvision.datasets.CIFAR100, "cifar-100-python"))
    created = not os.path.exists(root)
    os.makedirs(root, exist_ok=True)
    try:
        with contextlib.redirect_stdout(sys.stderr): sets = [cls(root, train=t, download=True) for t in (True, False)]
    except Exception as e:  # offline, or a half-downloaded archive
        if created and not os.listdir(root): os.rmdir(root)  # leave no empty ./data behind
        die(f"could not read or download {args.dataset} in {root} ({type(e).__name__}: {str(e).splitlines()[0]}); offline, "
            f"give --data-dir a folder holding torchvision's {folder}/ or train/<class>/*.png|jpg and test/<class>/*.png|jpg")
    xs = [(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets)) for d in sets]
    return (*[t[subset_indices(y, n)] for (x, y), n in zip(xs, sizes) for t in (x, y)], sets[0].classes)

def check_classes(train, test, root, test_split):
    """Labels are class indices in sorted folder order: the two splits must list exactly the same classes."""
    if train != test:
        only = lambda a, b: [c for c in a if c not in b][:3]  # noqa: E731
        die(f"the class folders of {root}/train ({len(train)}) and {root}/{test_split} ({len(test)}) differ "
            f"(only in train: {only(train, test)}, only in {test_split}: {only(test, train)}); labels would not "
            "line up: give both splits the same class folders")

def to_float(x_uint8, channels_last=False):
    return x_uint8.float().div_(255).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

class DeviceData:
    """CIFAR-sized data on the training device as uint8, cropped (4-pixel zero padding) and flipped there, no workers
    (airbench). The random numbers come from (seed, epoch) for the *global* batch: a DDP rank gets what one process would."""
    def __init__(self, x_train, y_train, x_test, y_test, classes, device, channels_last=False):
        self.x_train, self.y_train, self.x_test, self.y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
        self.classes, self.device, self.channels_last, self.image_hw = classes, device, channels_last, tuple(x_train.shape[-2:])
    def steps_per_epoch(self, batch_size): return len(self.y_train) // batch_size  # drops the last partial batch: equal steps on all ranks
    def train_batches(self, epoch, batch_size, seed, rank=0, world=1):
        # The epoch's random numbers are drawn on the CPU in a fixed order (the same on every device and
        # rank), then moved to the device once: the loop itself never copies from the host.
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        n, per_rank, steps = len(self.y_train), batch_size // world, self.steps_per_epoch(batch_size)
        order = torch.randperm(n, generator=g)[:steps * batch_size].view(steps, batch_size)
        draws = [(torch.randint(0, 9, (2, batch_size), generator=g), torch.rand(batch_size, generator=g) < 0.5)
                 for _ in range(steps)]
        if not steps: return
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        order = order[:, mine].to(self.device)
        shifts = torch.stack([d[0] for d in draws])[:, :, mine].to(self.device)  # (steps, 2: dy and dx, batch)
        flips = torch.stack([d[1] for d in draws])[:, mine].to(self.device)
        for s in range(steps):
            idx = order[s]
            x = self.augment(self.x_train[idx], shifts[s, 0], shifts[s, 1], flips[s])
            yield to_float(x, self.channels_last), self.y_train[idx]
    def augment(self, x, dy, dx, flip):
        """Random crop (zero padding 4) and flip as one gather; the offsets and flips are device tensors."""
        b, c, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = dx[:, None] + torch.arange(w, device=x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
        return padded[torch.arange(b, device=x.device)[:, None, None, None],
                      torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    def test_batches(self, batch_size, n=None, rank=0, world=1):
        idx = subset_indices(self.y_test.cpu(), n).to(self.device)[rank::world]
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield to_float(self.x_test[j], self.channels_last), self.y_test[j]

def _safe_pil_loader(path):  # an unreadable file is skipped with a warning, by whichever worker meets it
    from PIL import Image
    try:
        with open(path, "rb") as f: return Image.open(f).convert("RGB")
    except OSError as e:
        warn(f"skipping unreadable image {path} ({e})")
        return None

def _unless_unreadable(transform, image): return None if image is None else transform(image)
def _drop_unreadable(batch):  # None when every image of the batch was unreadable: the loops skip it
    batch = [b for b in batch if b[0] is not None]
    return torch.utils.data.default_collate(batch) if batch else None

class LoaderData:
    """ImageNet: ImageFolder train/, val/; DataLoaders (pinned, persistent workers), a DistributedSampler even for one."""
    def __init__(self, args, device, rank, world):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        self.root, s = args.data_dir or "data/imagenet", args.image_size
        list_image_folder(os.path.join(self.root, "val"))  # a clear error for a missing or empty folder
        wrap = functools.partial(functools.partial, _unless_unreadable)  # picklable, for spawned workers
        self.train_tf = wrap(T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip(), T.ToTensor()]))
        test_tf = wrap(T.Compose([T.Resize(round(s * 256 / 224)), T.CenterCrop(s), T.ToTensor()]))
        self.test_set = ImageFolder(os.path.join(self.root, "val"), test_tf, loader=_safe_pil_loader)
        self.classes, self.device, self.args, self._train_set = self.test_set.classes, device, args, None
        self.test_loaders, self.image_hw, train_dir = {}, (s, s), os.path.join(self.root, "train")
        if os.path.isdir(train_dir):
            check_classes(sorted(d.name for d in os.scandir(train_dir) if d.is_dir()), self.classes, self.root, "val")
    @property
    def train_set(self):  # built on first use: eval, tradeoff and plot need only val/
        if self._train_set is None:
            from torchvision.datasets import ImageFolder
            list_image_folder(os.path.join(self.root, "train"))
            self._train_set = ImageFolder(os.path.join(self.root, "train"), self.train_tf, loader=_safe_pil_loader)
            if self.args.subset:
                self._train_set = torch.utils.data.Subset(self._train_set, subset_indices(self._train_set.targets, self.args.subset))
        return self._train_set
    def _loader(self, dataset, batch_size, sampler=None, train=False):  # workers kept from epoch to epoch
        return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=self.args.workers, drop_last=train,
                                           pin_memory=self.device.type == "cuda", persistent_workers=self.args.workers > 0, collate_fn=_drop_unreadable)
    def steps_per_epoch(self, batch_size): return len(self.train_set) // batch_size
    def train_batches(self, epoch, batch_size, seed, rank=0, world=1):
        if not hasattr(self, "train_loader"):
            sampler = torch.utils.data.DistributedSampler(self.train_set, world, rank, seed=seed, drop_last=True)
            self.train_loader = self._loader(self.train_set, batch_size // world, sampler, train=True)
        self.train_loader.sampler.set_epoch(epoch)
        yield from self._on_device(self.train_loader)
    def test_batches(self, batch_size, n=None, rank=0, world=1):
        key = (batch_size, n, rank, world)  # one loader per setting, its workers kept from epoch to epoch
        if key not in self.test_loaders:
            idx = subset_indices(self.test_set.targets, n)[rank::world].tolist()
            self.test_loaders[key] = self._loader(torch.utils.data.Subset(self.test_set, idx), batch_size)
        yield from self._on_device(self.test_loaders[key])
    def _on_device(self, loader):
        for x, y in filter(None, loader):  # (None: every image of the batch was unreadable)
            x = x.to(self.device, non_blocking=True)
            yield x.contiguous(memory_format=torch.channels_last) if self.args.channels_last else x, y.to(self.device, non_blocking=True)

def load_data(args, device, rank=0, world=1):
    if args.dataset == "imagenet": return LoaderData(args, device, rank, world)
    if args.dataset == "synthetic":
        if args.data_dir: die("--data-dir is not used with the built-in synthetic data (the checkpoint's, too); drop it")
        xtr, ytr, xte, yte, classes = synthetic_data()
        itr, ite = subset_indices(ytr, args.subset), subset_indices(yte, args.test_n)
        return DeviceData(xtr[itr], ytr[itr], xte[ite], yte[ite], classes, device, args.channels_last)
    return DeviceData(*cifar_arrays(args), device, args.channels_last)

# ---- 5.3 Training ------------------------------------------------------------------------------
def setup_device(args):
    """(device, rank, world). Under torchrun: one process per GPU (nccl), or gloo on the CPU."""
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {want} was asked for, but no CUDA device is visible; use --device cpu")
    if want == "cpu":  # x86 slows down by up to a third on the denormal floats that PGD's input gradients make on some data
        torch.set_flush_denormal(True)
    distributed, device = int(os.environ.get("WORLD_SIZE", "1")) > 1, torch.device(want)
    if device.type == "cuda":
        # Its index (torchrun: LOCAL_RANK's GPU; a bare "cuda": the current one), current before any collective (NCCL)
        index = int(os.environ.get("LOCAL_RANK", 0)) if distributed else device.index
        device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its kernels once and keeps the fastest
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 for fp32 GEMMs/convs
    rank, world = 0, 1
    if distributed:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    return device, rank, world

def place(net, args, device):
    """The model on `device`, in channels_last memory format and compiled when the flags ask for it."""
    net.to(device)
    if args.channels_last: net.to(memory_format=torch.channels_last)
    if args.compile: net.compile()  # compiles forward in place; state_dict keys stay as they are
    return net

def amp_context(args, device):
    """A factory of fresh autocast contexts (bf16 with --amp); `with amp():` wherever a forward runs."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.amp))

def cosine_lr(step, total, base, warmup=0):
    """Cosine schedule (§5), per step: a resumed run needs no state. --warmup: first a linear ramp base·(step+1)/warmup
    (as the public AdvProp and dual-BN codes do), then the cosine over the rest. warmup=0 is the paper's schedule."""
    return base * (step + 1) / warmup if step < warmup else base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

def all_reduce(values, device):
    """Sums of Python numbers over the DDP ranks (a single process has nothing to add)."""
    if not dist.is_initialized(): return [float(v) for v in values]
    dist.all_reduce(t := torch.tensor(values, dtype=torch.float64, device=device))  # in place: t becomes the sums
    return t.tolist()

def accuracy(model, data, u, eps=0.0, steps=0, batch_size=256, n=None, amp=contextlib.nullcontext, rank=0, world=1):
    """Accuracy at mask u on (a fixed balanced n of) the test set, under PGD-`steps` at ε > 0; eval mode, DDP-summed."""
    was_training = model.training
    model.eval()
    set_mask(model, u)
    correct, total = torch.zeros((), dtype=torch.long, device=data.device), 0  # counted on the device: no wait per batch
    for x, y in data.test_batches(batch_size, n, rank, world):
        if eps > 0:
            with amp(): x = pgd(model, x, y, eps, eps / ALPHA_DIV, steps, check=False)
        with torch.no_grad(), amp(): correct += (model(x).argmax(1) == y).sum()
        total += len(y)
    model.train(was_training)
    correct, total = all_reduce([correct.item(), total], data.device)
    return correct / max(total, 1), int(total)

FINITE_EVERY = 50  # steps between checks that the loss is finite: each check makes the host wait for the GPU
def fmt_time(s): return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"

def method_kwargs(args):
    """The keywords of method_loss that a train (or finetune-bn) run's arguments fix."""
    return dict(method=args.method, k=args.k, fix_p=args.fix_p, adv_only=args.robmask_adv_only, eps_max=args.eps_max,
                attack_steps=args.attack_steps, attack_bn=args.attack_bn, freeze_stats=getattr(args, "freeze_stats", False))

def train_epoch(epoch, net, step_module, opt, data, args, amp, device, rank, world, total_steps):
    """One epoch of Algorithm 1; its log entry: mean loss, clean training accuracy, each branch's mean loss, img/s, s."""
    net.train()
    steps = data.steps_per_epoch(args.batch_size)
    warmup, branch_sum, hits, seen = round(args.warmup * steps), 0.0, None, 0
    # p is drawn from its own generator, seeded from (seed, epoch) and identical on every rank,
    # so that all ranks use the same mask u(p); the PGD random starts use torch's per-rank RNG.
    p_gen, method = torch.Generator().manual_seed(args.seed * 7919 + epoch), method_kwargs(args)
    torch.manual_seed(args.seed * 100_003 + epoch * 1_009 + rank)
    loss_sum, t0, last_print = torch.zeros((), device=device), time.time(), time.time()
    first_bad, bad_loss = torch.full((), steps, device=device), torch.zeros((), device=device)  # steps: none yet
    for step, (x, y) in enumerate(data.train_batches(epoch, args.batch_size, args.seed, rank, world)):
        for group in opt.param_groups if opt is not None else []:
            group["lr"] = cosine_lr(epoch * steps + step, total_steps, args.lr, warmup)
        loss = train_step(net, step_module, opt, x, y, amp, p_gen, **method)  # p not given: method_loss draws it
        new_bad = ~torch.isfinite(loss) & (first_bad == steps)  # on the device: no wait for the GPU here
        first_bad, bad_loss = torch.where(new_bad, step, first_bad), torch.where(new_bad, loss, bad_loss)
        if (step + 1) % FINITE_EVERY == 0 or step + 1 == steps: stop_if_nonfinite(first_bad, bad_loss, steps, epoch, world)
        loss_sum += loss
        ces, step_hits = getattr(step_module, "module", step_module).last  # DDP keeps BranchLoss as .module
        branch_sum = branch_sum + ces
        if step_hits is not None: hits, seen = (step_hits if hits is None else hits + step_hits), seen + len(y)
        if step == 0: t1 = time.time()  # rate and ETA leave the first step out: it warms up (and compiles: --compile)
        if time.time() - last_print > args.log_every and rank == 0:  # progress inside a long epoch
            last_print, done = time.time(), step + 1
            sec, acc = (time.time() - t1) / max(done - 1, 1), f"  train_acc {hits.item() / seen:.4f}" if hits is not None else ""
            log(f"  epoch {epoch + 1} step {done}/{steps}  loss {loss_sum.item() / done:.4f}{acc}  " + (f"{args.batch_size / max(sec, 1e-9):.0f} "
                f"img/s  epoch ETA {fmt_time((steps - done) * sec)}" if done > 1 else f"first step {time.time() - t0:.1f}s (warm-up)"))
    seconds = time.time() - t0
    sums = all_reduce([loss_sum.item(), seen, hits.item() if hits is not None else 0, *branch_sum.tolist()], device)
    entry = dict(train_loss=sums[0] / world / max(steps, 1), train_acc=sums[2] / max(sums[1], 1) if hits is not None else None,
                 branch_loss=[b / world / max(steps, 1) for b in sums[3:]])  # each branch's own mean CE, clean first
    entry = {key: v for key, v in entry.items() if v is not None and (key != "branch_loss" or len(v) > 1)}
    return dict(entry, img_per_s=steps * args.batch_size / max(seconds, 1e-9), seconds=seconds)

def stop_if_nonfinite(first_bad, bad_loss, steps, epoch, world):
    """Stop every rank if a step of this epoch had a non-finite loss (called every FINITE_EVERY steps, before saves)."""
    flag = first_bad.clone()
    if world > 1: dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not bool(flag == steps):  # (steps: no step was bad)
        seen = f"{bad_loss.item()} here" if first_bad < steps else "on another rank"
        die(f"the loss became non-finite ({seen}) at epoch {epoch + 1}, step {int(flag) + 1}; training stopped and the "
            "last good checkpoint was kept. Lower --lr (or check the data) and start again")

def check_ranks_agree(net, device):
    """Under DDP every rank must hold the same weights; returns the largest difference to rank 0."""
    flat = torch.cat([w.detach().flatten().float() for w in net.parameters()])
    dist.broadcast(ref := flat.clone(), 0)  # in place: ref becomes rank 0's copy
    return all_reduce([(flat - ref).abs().max().item()], device)[0]

def start_run(args, given, device, rank, world, init_from=None):
    """Data, model and optimiser of a run, resumed from --out's checkpoint where there is one. None: nothing to do."""
    ckpt = prepare_out_dir(args, given)
    if ckpt is not None and ckpt.get("complete"):
        log(f"[skip] {args.out} is complete ({ckpt['epoch']} epochs)")
        return None  # nothing to do
    data = load_data(args, device, rank, world)
    if args.num_classes not in (None, len(data.classes)) or getattr(args, "classes", None) not in (None, [], list(data.classes)):
        die(f"the checkpoint's {args.num_classes} classes are not the {len(data.classes)} classes of the data in "
            f"{args.data_dir} (names or number differ); give the matching --data-dir")
    args.num_classes, args.k, args.classes = len(data.classes), method_k(args.method, args.k), list(data.classes)
    torch.manual_seed(args.seed)
    net = build_model(args.arch, args.num_classes, args.k, args.width, args.dataset, args.bn_stats)
    try:  # one tiny forward now, rather than a shape error deep inside the first epoch
        net.eval()(torch.zeros(2, 3, *data.image_hw)).detach()
    except RuntimeError as e:
        die(f"images of {data.image_hw[0]}x{data.image_hw[1]} are too small for {args.arch} "
            f"({str(e).splitlines()[0][:100]}); use larger images (--image-size) or another --arch")
    what = f"{args.arch} (k={args.k}, {args.num_classes} classes)"
    if init_from is not None:  # finetune-bn: start from the source checkpoint's weights
        load_state(net, read_checkpoint(init_from)["model"], init_from, what)
    args.params = count_params(net)
    place(net, args, device)
    params = trainable_parameters(net, args.bn_params)  # §5: SGD, momentum 0.9, weight decay 5e-4, lr 0.1 for θ, W, W'
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd) if params else None
    if ckpt is None: return data, net, opt, [], 0, what
    load_state(net, ckpt["model"], args.out, what)
    if opt is not None: opt.load_state_dict(ckpt["optimizer"])
    log(f"resuming {args.out} after epoch {ckpt['epoch']}")
    return data, net, opt, ckpt["log"], ckpt["epoch"], what

def fit(args, given, init_from=None):
    """The training loop shared by `train` and `finetune-bn`: DDP, AMP, compile, checkpoints, resume."""
    device, rank, world = setup_device(args)
    if args.batch_size % world or args.batch_size // world < 2:
        die(f"--batch-size {args.batch_size} is the global batch; it must divide among the {world} processes, "
            "with at least 2 images each (BN training needs 2)")
    run = start_run(args, given, device, rank, world, init_from)
    if run is None: return
    data, net, opt, history, start, what = run
    args_json = {key: v for key, v in vars(args).items() if key != "check"}
    if rank == 0: write_json(os.path.join(args.out, "args.json"), args_json)
    amp, steps = amp_context(args, device), data.steps_per_epoch(args.batch_size)
    step_module = BranchLoss(net, amp)
    if world > 1 and opt is not None:  # (finetune-bn --params stats trains nothing: no gradients to all-reduce)
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[device] if device.type == "cuda" else None)
    if steps == 0:
        die(f"the training set has fewer images ({args.subset or 'all'}) than one batch ({args.batch_size}); lower --batch-size")
    job = f"fine-tuning BN ({args.bn_params}) on {args.finetune_on} images" if args.bn_params else f"training {args.method}"
    log(f"{job} ({what}, {args.params:,} parameters) on {args.dataset}: {args.epochs} epochs "
        f"x {steps} steps of {args.batch_size}, {world} process(es) on {device}")
    for epoch in range(start, args.epochs):
        ep = train_epoch(epoch, net, step_module, opt, data, args, amp, device, rank, world, args.epochs * steps)
        acc, _ = accuracy(net, data, mask_for(args.method, 0, args.k), batch_size=2 * args.batch_size // world,
                          n=args.test_n, amp=amp, rank=rank, world=world)
        lr = cosine_lr((epoch + 1) * steps, args.epochs * steps, args.lr, round(args.warmup * steps))
        entry = dict(epoch=epoch + 1, lr=lr, test_acc=acc, **ep)
        if world > 1: entry["rank_max_abs_diff"] = check_ranks_agree(net, device)
        history.append(entry)
        extra = f"  train_acc {ep['train_acc']:.4f}" if "train_acc" in ep else ""
        extra += f"  branches {' '.join(f'{b:.3f}' for b in ep['branch_loss'])}" if "branch_loss" in ep else ""
        log(f"epoch {epoch + 1}/{args.epochs}  loss {ep['train_loss']:.4f}{extra}  test_acc {acc:.4f}  lr {lr:.4f}  "
            f"{ep['img_per_s']:.0f} img/s  {ep['seconds']:.1f}s")
        bad = next((key for key, t in net.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:  # every rank holds the same weights, so every rank stops here
            die(f"the weights became non-finite ({bad}) in epoch {epoch + 1}; nothing was saved for it"
                f"{', the last good checkpoint stays' if start or epoch else ''}. Lower --lr (or check the data) and start again")
        if rank == 0: save_run(args.out, net, opt, args_json, epoch + 1, history, complete=epoch + 1 == args.epochs)
    if args.epochs == start == 0 and rank == 0: save_run(args.out, net, opt, args_json, 0, history, complete=True)
    if world > 1: dist.barrier()  # nobody tears down the process group while rank 0 is still writing its checkpoint

def cmd_train(args, given):
    args.num_classes = args.classes = args.bn_params = args.finetune_on = None  # set by the data, and by finetune-bn
    run_training(args, given)

def cmd_finetune_bn(args, given):
    """§3.1 / Table 1: fine-tune only BN of a trained k=1 model, on clean images or on PGD examples."""
    stored = dict(read_checkpoint(args.ckpt)["args"])
    if stored["k"] != 1:
        die(f"finetune-bn works on single-BN (k=1) checkpoints such as bn or adv runs; {args.ckpt} has k={stored['k']}")
    stored.update({key: v for key, v in vars(args).items() if key != "ckpt" and (v is not None or key not in stored)})
    stored.update(method="bn" if args.finetune_on == "clean" else "adv", source=os.path.abspath(args.ckpt), warmup=0)
    resuming = args.resume and os.path.exists(os.path.join(args.out, "checkpoint.pt"))
    run_training(argparse.Namespace(**stored), given, init_from=None if resuming else args.ckpt)

# ---- 5.4 Evaluation: PGD-100 and AutoAttack, under a chosen mask ---------------------------------
# The mask to evaluate with (--mask): `clean` is u(0), deployable (the defender cannot know ε); `matched` is u(ε/ε_max)
# per row, as the robustness tables compare methods (AdvProp: main BN at ε=0, auxiliary otherwise); a number P is u(P).
def row_mask(stored, mask, eps):
    """(u, the strength u stands for): --recalibrate measures at that strength (clean → 0, matched → ε)."""
    if mask == "clean": return mask_for(stored["method"], 0.0, stored["k"]), 0.0
    if mask == "matched":
        return mask_for(stored["method"], eps / stored["eps_max"] if stored["eps_max"] else 0.0, stored["k"]), eps
    return encode(float(mask), stored["k"]), float(mask) * stored["eps_max"]

def eval_data(args, stored, device):
    """The test data that a checkpoint was trained on (or in --data-dir instead)."""
    # the test split, and N training images for --recalibrate N (subset=1: an image-folder reader decodes no more)
    a = argparse.Namespace(**dict(stored, test_n=None, data_dir=getattr(args, "data_dir", None) or (
        stored.get("data_dir") if stored["dataset"] != "synthetic" else None), subset=getattr(args, "recalibrate", None) or 1,
        channels_last=False, workers=getattr(args, "workers", WORKERS), image_size=stored.get("image_size", 224)))
    data = load_data(a, device)
    if len(data.classes) != stored["num_classes"] or stored.get("classes", data.classes) != list(data.classes):
        die(f"the checkpoint's {stored['num_classes']} classes are not the {len(data.classes)} class folders of "
            f"{a.data_dir or a.dataset} (names or number differ); pass the --data-dir it was trained on")
    return data

# Precise BN (Wu & Johnson 2021): the running averages were estimated while the weights moved (and, under --bn-stats
# mixed, with a bias). --recalibrate N measures at mask u each BN input's mean and unbiased variance over N training
# images (PGD examples at u's ε, clean for ε=0), into a copy with one set of statistics per layer.
def recalibrate(model, batches, u, eps=0.0, steps=ATTACK_STEPS):
    model = copy.deepcopy(model)
    layers = masked_layers(model)
    moments = {m: torch.zeros(3, m.num_features, dtype=torch.float64, device=m.W.device) for m in layers}
    def measure(m, inputs):  # count, Σx and Σx² per channel, in float64
        x = inputs[0].detach().double()
        moments[m] += torch.stack([torch.full_like(x[0, :, 0, 0], x.numel() / x.shape[1]), x.sum((0, 2, 3)),
                                   x.pow(2).sum((0, 2, 3))])
    for x, y in batches:
        if eps > 0:  # attack the model as loaded, in eval mode with mask u
            model.eval()
            set_mask(model, u)
            x = pgd(model, x, y, eps, eps / ALPHA_DIV, steps, check=False)
        hooks = [m.register_forward_pre_hook(measure) for m in layers]
        model.train()
        set_mask(model, u, adversarial=eps > 0)
        with torch.no_grad(), attack_bn_mode(model, "train"):  # batch statistics, running ones untouched
            try: model(x)
            except ValueError as e:  # "Expected more than 1 value per channel": a batch of 1 on 1x1 maps
                die(f"--recalibrate cannot measure BN statistics here ({str(e).splitlines()[0][:80]}); give it more "
                    "training images (at least 2 per batch)")
        for h in hooks: h.remove()
    for m, (n, s1, s2) in moments.items():
        if not n[0] >= 2: die("--recalibrate needs at least 2 values per channel; give it more training images")
        mean = s1 / n
        m.running_mean = mean.float()[None]  # one set of statistics, whatever u: the layer reads it as `shared`
        m.running_var = ((s2 - s1 * mean) / (n - 1)).float()[None]
        m.stats = "shared"
    return model.eval()

def recalibrated(model, stored, args, data, cache, u, eps_r):
    """The model to measure at mask u: itself, or (--recalibrate N) its recalibrated copy, cached per (u, ε)."""
    key, t0 = (tuple(u.tolist()), eps_r), time.time()
    if not args.recalibrate: return model
    if key not in cache:
        have = data.steps_per_epoch(1)  # the training set's size
        b = min(math.ceil(args.recalibrate / math.ceil(args.recalibrate / args.batch_size)), have)  # equal batches, ≤ N
        if data.steps_per_epoch(b) * b < args.recalibrate:  # say (and record) how many images there really were
            warn(f"--recalibrate {args.recalibrate}: the training set has only {have} images; recalibrating on "
                 f"{data.steps_per_epoch(b) * b} of them")
            args.recalibrate = data.steps_per_epoch(b) * b
        cache[key] = recalibrate(model, data.train_batches(0, b, args.seed), u, eps_r, stored.get("attack_steps", ATTACK_STEPS))
        log(f"  recalibrated BN statistics at u={[round(v, 3) for v in u.tolist()]} on {args.recalibrate} training "
            f"images ({f'PGD at {eps_r * 255:.2f}/255' if eps_r else 'clean'}, {time.time() - t0:.1f}s)")
    return cache[key]

class FixedMask(nn.Module):
    """The model as a plain classifier, x in [0,1] -> logits, with the mask u(p) or an explicit u (for AutoAttack)."""
    def __init__(self, model, p=0.0, u=None):
        super().__init__()
        self.model, u = model, encode(p, num_bases(model)) if u is None else u
        self.register_buffer("u", torch.as_tensor(u, dtype=torch.float32, device=masked_layers(model)[0].W.device))
    def forward(self, x):
        set_mask(self.model, self.u)
        return self.model(x)
fixed_mask = FixedMask  # the library's name for it

def autoattack_accuracy(model, data, u, eps, args, device):
    """Robust accuracy under AutoAttack (pyautoattack) with the mask fixed to u."""
    import logging
    from pyautoattack import AutoAttack
    logger = logging.getLogger("auto-attack")  # it reports progress at DEBUG level: show it
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stdout))
        logger.handlers[0].setFormatter(logging.Formatter("  autoattack: %(message)s"))
    logger.setLevel(logging.DEBUG)
    x, y = map(torch.cat, zip(*data.test_batches(args.batch_size, args.n)))
    clf = fixed_mask(model, u=u).eval()
    if eps > 0:
        attacks = args.aa_attacks.split(",") if args.aa_version == "custom" else None
        aa = AutoAttack(clf, norm="Linf", eps=eps, version=args.aa_version, attacks=attacks, device=device, seed=args.seed)
        x, _ = aa.run_standard_evaluation(x, y, batch_size=args.batch_size)
    with torch.no_grad():
        correct = sum((clf(x[i:i + args.batch_size]).argmax(1) == y[i:i + args.batch_size]).sum().item()
                      for i in range(0, len(y), args.batch_size))
    return correct / len(y), len(y)

def cmd_eval(args):
    args.out = args.out and check_out(args.out, "results", args.force)
    device, _, _ = setup_device(args)
    model, stored = load_checkpoint(args.ckpt, device)
    data = eval_data(args, stored, device)
    rows, cache = [], {}
    for eps in (args.eps if args.attack != "none" else [0.0]):
        u, eps_r = row_mask(stored, args.mask, eps)
        m = recalibrated(model, stored, args, data, cache, u, eps_r)
        torch.manual_seed(args.seed)  # the same PGD random starts on every call
        t0 = time.time()
        acc, n = (autoattack_accuracy(m, data, u, eps, args, device) if args.attack == "autoattack" else
                  accuracy(m, data, u, eps, args.steps, args.batch_size, args.n, amp_context(args, device)))
        rows.append(dict(attack=args.attack, eps=eps, steps=args.steps if args.attack == "pgd" else None,
                         mask=args.mask, u=u.tolist(), accuracy=acc, n=n, recalibrate=args.recalibrate))
        log(f"{args.attack:10s} eps {eps * 255:5.2f}/255  mask {args.mask:7s} u={[round(v, 3) for v in u.tolist()]}  "
            f"accuracy {acc:.4f}  (n={n}, {time.time() - t0:.1f}s)")
    result = dict(checkpoint=args.ckpt, method=stored["method"], rows=rows, amp=args.amp, run_id=stored["run_id"],
                  run_epoch=stored["run_epoch"])
    if args.attack == "autoattack": result["aa"] = args.aa_version + (f": {args.aa_attacks}" if args.aa_version == "custom" else "")
    if args.out: write_json(args.out, result)
    return result

# §3.2's slider from two checkpoints: their BN layers become the two bases of one k=2 model.
def combine_checkpoints(path_a, path_b, device="cpu"):
    """A k=2 model whose bases are the BN layers of two k=1 checkpoints that differ only in BN."""
    (model_a, stored), (model_b, stored_b) = load_checkpoint(path_a, device), load_checkpoint(path_b, device)
    for key in ("arch", "width", "num_classes"):
        if stored[key] != stored_b[key]:
            die(f"{path_a} and {path_b} differ in {key} ({stored[key]} vs {stored_b[key]}); the two-checkpoint "
                "trade-off needs one architecture, e.g. a model and its finetune-bn copy")
    if num_bases(model_a) != 1 or num_bases(model_b) != 1:
        die("the two-checkpoint trade-off combines two single-BN (k=1) checkpoints; for one RobMask or "
            "AdvProp checkpoint, pass it alone to sweep its own encoding")
    bn_keys = {f"{n}.{t}" for n, m in model_a.named_modules() if isinstance(m, MaskedBatchNorm2d)
               for t in ("W", "Wp", "running_mean", "running_var", "num_batches_tracked")}
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    for key in sd_a:
        if key not in bn_keys and not torch.equal(sd_a[key], sd_b[key]):
            die(f"{path_a} and {path_b} differ outside BN (tensor {key}); the two-checkpoint trade-off needs "
                "models that differ only in BN, e.g. a model and its finetune-bn copy")
    model = build_model(stored["arch"], stored["num_classes"], 2, stored["width"], stored["dataset"])
    model.load_state_dict({key: torch.cat([t, sd_b[key]]) if key in bn_keys and not key.endswith("num_batches_tracked")
                           else t for key, t in sd_a.items()})
    return model.to(device).eval(), stored

def cmd_tradeoff(args):
    """§3.2 / Table 2: clean and PGD accuracy along u = [1-p, p]."""
    args.out = check_out(args.out, "results", args.force)
    device, _, _ = setup_device(args)
    if args.ckpt_b: model, stored = combine_checkpoints(args.ckpt, args.ckpt_b, device)
    else:
        model, stored = load_checkpoint(args.ckpt, device)
        if stored["k"] < 2:
            die(f"{args.ckpt} has a single BN (k=1): there is nothing to slide between. Pass a second "
                "checkpoint that differs only in BN (e.g. its finetune-bn copy), or a RobMask/AdvProp run")
    data, rows, cache, amp = eval_data(args, stored, device), [], {}, amp_context(args, device)
    for p in args.p:
        u = encode(p, num_bases(model))
        # --recalibrate: a RobMask/AdvProp checkpoint's u(p) stands for ε = p·ε_max; the two-checkpoint
        # slider's bases stand for no ε (its p=1 end was tuned on clean images), so clean images for all p
        m = recalibrated(model, stored, args, data, cache, u, 0.0 if args.ckpt_b else p * stored["eps_max"])
        clean, n = accuracy(m, data, u, 0.0, 0, args.batch_size, args.n, amp)
        torch.manual_seed(args.seed)
        robust, _ = accuracy(m, data, u, args.eps, args.steps, args.batch_size, args.n, amp)
        rows.append(dict(p=p, u=u.tolist(), clean=clean, robust=robust, eps=args.eps, steps=args.steps, n=n,
                         recalibrate=args.recalibrate))
        log(f"p {p:.2f}  clean {clean:.4f}  pgd{args.steps}@{args.eps * 255:.1f}/255 {robust:.4f}  (n={n})")
    write_json(args.out, result := dict(checkpoints=[c for c in (args.ckpt, args.ckpt_b) if c], rows=rows))
    return result

# Export: with u fixed, every masked BN *is* a BN with γ = Σ_j u_j w_j, β = Σ_j u_j w'_j and u's statistics: folded, a
# plain model that any tool evaluates (RobustBench's convention: [0,1] NCHW in, logits out, normalisation inside).
def fold_mask(model, u):
    """The state_dict of a k=1 model that computes in eval mode exactly what `model` computes at mask u."""
    set_mask(model, u)
    folded = {f"{name}.{key}": t.detach()[None].clone() for name, m in model.named_modules() if isinstance(m, MaskedBatchNorm2d)
              for key, t in zip(("W", "Wp", "running_mean", "running_var"), (m.mix(m.W), m.mix(m.Wp), *m.eval_stats()))}
    return dict(model.state_dict(), **folded)

def cmd_export(args):
    args.out = check_out(args.out, "export", args.force)
    meta_path = check_out(args.out + ".json", "sidecar", args.force, "--out's sidecar") if args.format == "torchvision" else None
    model, stored = load_checkpoint(args.ckpt)
    u, _ = row_mask(stored, args.mask, 0.0)
    sd = fold_mask(model, u)
    if args.format == "robmask":  # a k=1 robmask checkpoint: eval, tradeoff, finetune-bn and plot all take it
        a = dict({key: v for key, v in stored.items() if key not in ("run_id", "run_epoch")}, k=1, method="bn", bn_stats="mixed",
                 exported_from=os.path.abspath(args.ckpt), export_u=u.tolist())
        ckpt = dict(format=FORMAT, model=sd, args=a, epoch=0, log=[], complete=True, optimizer=None)
        atomic_write(args.out, lambda f: torch.save(to_cpu(ckpt), f))
    else:  # torchvision.models.<arch>(num_classes=N).load_state_dict(sd, strict=True), constants in OUT.json
        if stored["dataset"] != "imagenet":
            die(f"--format torchvision needs a torchvision architecture (a --dataset imagenet run); {stored['arch']} is "
                "robmask's own CIFAR model: use --format robmask")
        names, tv = {"W": "weight", "Wp": "bias"}, {}
        for key, t in sd.items():  # (key[2:] drops the "1." of Sequential(Normalize, body))
            body, _, leaf = key[2:].rpartition(".")
            tv[f"{body}.{names.get(leaf, leaf)}"] = t[0] if leaf in ("W", "Wp", "running_mean", "running_var") else t
        atomic_write(args.out, lambda f: torch.save(to_cpu(tv), f))
        mean, std = MEAN_STD[stored["dataset"]]
        write_json(meta_path, dict(arch=stored["arch"], num_classes=stored["num_classes"], mean=mean, std=std,
                                   classes=stored.get("classes"), u=u.tolist(), source=os.path.abspath(args.ckpt)))
    log(f"wrote {args.out}: {stored['arch']} with the mask u={[round(v, 3) for v in u.tolist()]} folded in ({args.format})")

# ---- 5.5 bench: time, FLOPs, MFU and memory of a training step, per method ----------------------
def _timed(device, fn, reps=1):
    """Seconds for `reps` calls of fn, the device synchronised before and after (CUDA runs asynchronously)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    for _ in range(reps): fn()
    sync()
    return time.perf_counter() - t0

def piece_flops(net, x, y, amp=contextlib.nullcontext):
    """FLOPs (torch.utils.flop_counter) of the two pieces of every method's step, on the batch x: a training forward +
    backward, and one attack step (to the input only; the counter cannot trace pgd's autograd.grad on a leaf input)."""
    from torch.utils.flop_counter import FlopCounterMode
    def count(fn):
        counter = FlopCounterMode(display=False)
        with counter, amp(): fn()
        return counter.get_total_flops()
    train = count(lambda: F.cross_entropy(net(x).float(), y).backward())
    net.requires_grad_(False)  # (the models bench and cost build train every parameter)
    attack = count(lambda: F.cross_entropy(net(x.clone().requires_grad_(True)).float(), y).backward())
    net.requires_grad_(True).zero_grad(set_to_none=True)
    return train, attack

def method_flops(method, train, attack, attack_steps=ATTACK_STEPS, k=None, adv_only=False):
    """A step of `method`: one training forward+backward per branch, attack_steps attack steps per attacked one."""
    return sum(train + (attack_steps * attack if s > 0 else 0) for s, _ in branches(method, 0.5, k, adv_only))

def matmul_rate(device, amp, n=2048, reps=10):
    """MFU's denominator: the dense matmul rate in training's dtype, as a 1x1 convolution of n×n by n×n (cuDNN; oneDNN on
    the CPU, faster there than torch.mm). A large n nears the peak (an H200, bf16: 503 TFLOP/s at 2048, 790 at 8192)."""
    a = torch.randn(1, n, n, 1, device=device, dtype=torch.bfloat16 if amp else torch.float32)
    _timed(device, lambda: F.conv2d(a, a.view(n, n, 1, 1)), 2)  # warm-up
    return 2 * n**3 * reps / _timed(device, lambda: F.conv2d(a, a.view(n, n, 1, 1)), reps)

def peak_memory_mb(step, batch, cuda):
    """CUDA's peak memory over two steps, no other case's model, gradients or state alive (None on a CPU: no counter)."""
    gc.collect()
    if not cuda: return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2): step(*batch, 0.5)
    return torch.cuda.max_memory_allocated() / 2**20

BENCHED = ("bn", "adv", "advprop", "robmask")

def cmd_bench(args):
    """Each method's training step (the paper's ε_max and PGD steps) timed round-robin in one process, so that machine
    drift hits every case alike: medians, images/s, FLOPs, MFU, CUDA peak memory, and §5's ratio RobMask/AdvProp."""
    args.out = args.out and check_out(args.out, "results", args.force)
    device, _, _ = setup_device(args)
    amp, cuda, n = amp_context(args, device), device.type == "cuda", max(8 * args.batch_size, 1024)
    torch.manual_seed(0)  # (the models below: the same on every call)
    data = DeviceData(*synthetic_data(n, 1), device, args.channels_last)  # CIFAR-sized, on the device
    batches = [b for _, b in zip(range(4), data.train_batches(0, args.batch_size, 0))]
    def training_step(method):  # a full training step of `method`
        net = place(build_model(args.arch, 10, method_k(method), args.width), args, device)
        opt, loss_module = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), BranchLoss(net, amp)
        return lambda x, y, p: train_step(net, loss_module, opt, x, y, amp, method=method, p=p)
    def plain_step():  # bn's step on the same network with torch's BatchNorm2d: the cost of the paper's layer itself
        net = place(plain_model(args.arch, 10, args.width), args, device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        def step(x, y, p):
            with amp(): loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    peak = {m: peak_memory_mb(training_step(m), batches[0], cuda) for m in BENCHED}  # each method alone
    cases = dict({m: training_step(m) for m in BENCHED}, plain_bn=plain_step())
    times, gen = {name: [] for name in cases}, torch.Generator().manual_seed(0)
    log(f"bench: {args.arch} width {args.width}, batch {args.batch_size}, {args.steps} timed steps "
        f"(+{args.warmup} warm-up) per case, round-robin, on {device}")
    for r in range(args.warmup + args.steps):  # round-robin: machine drift hits every case alike
        for name, step in cases.items():
            x, y = batches[r % len(batches)]
            p = torch.rand((), generator=gen).item()
            seconds = _timed(device, lambda: step(x, y, p))
            if r >= args.warmup: times[name].append(seconds)
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    pipeline = data.steps_per_epoch(args.batch_size) * args.batch_size / _timed(  # the data pipeline alone
        device, lambda: [None for _ in data.train_batches(1, args.batch_size, 0)])
    pieces = piece_flops(build_model(args.arch, 10, 2, args.width).to(device), *batches[0], amp)
    flops, rate = {m: method_flops(m, *pieces) for m in BENCHED}, matmul_rate(device, args.amp)
    big = matmul_rate(device, args.amp, 8192 if cuda else 4096, 3)  # near the device's peak: the other denominator
    result = dict(device=str(device), arch=args.arch, width=args.width, batch_size=args.batch_size, steps=args.steps,
                  amp=bool(args.amp), channels_last=bool(args.channels_last), compile=bool(args.compile),
                  threads=torch.get_num_threads(), step_seconds=med, img_per_s={m: args.batch_size / med[m] for m in BENCHED},
                  ratios=dict(robmask_over_advprop=med["robmask"] / med["advprop"],  # §5's Timing: 890 s / 870 s
                              masked_bn_over_plain_bn=med["bn"] / med["plain_bn"],
                              pipeline_over_train=pipeline / (args.batch_size / med["bn"])),
                  pipeline_img_per_s=pipeline, flops_per_step=flops, matmul_flops_per_s=rate, large_matmul_flops_per_s=big,
                  mfu={m: flops[m] / med[m] / rate for m in BENCHED}, mfu_of_large={m: flops[m] / med[m] / big for m in BENCHED},
                  peak_memory_mb=peak)
    log(f"{'method':10s} {'step s':>8s} {'img/s':>8s} {'GFLOP/step':>11s} {'MFU':>6s} {'MFU*':>6s} {'peak MB':>8s}")
    for m in BENCHED:
        log(f"{m:10s} {med[m]:8.4f} {result['img_per_s'][m]:8.1f} {flops[m] / 1e9:11.2f} {result['mfu'][m]:6.1%} "
            f"{result['mfu_of_large'][m]:6.1%} {f'{peak[m]:.0f}' if cuda else '-':>8s}")
    log(f"MFU: of a 2048³ matmul, {rate / 1e12:.2f} TFLOP/s here; MFU*: of a {8192 if cuda else 4096}³ one, {big / 1e12:.2f} "
        "TFLOP/s (on a GPU, nearer its peak)")
    log(f"bn with plain BatchNorm2d: {med['plain_bn']:.4f} s per step; data pipeline {pipeline:.0f} img/s")
    for key, v in result["ratios"].items(): log(f"{key:28s} {v:.3f}")
    if args.out: write_json(args.out, result)
    return result

# ---- cost: what run_all.sh's stages would take at full scale, from counted FLOPs ---------------------------------
# Measured (issue 30): a RobMask step on one H200, width 64, batch 512, bf16, channels_last, eager: 6,721 img/s,
# 29.7% of the 503 TFLOP/s that bench's 2048³ matmul reaches there. At the paper's batch 128 it is slower (unmeasured).
COST_DEVICE = ("an H200 at the 149 TFLOP/s measured for a RobMask step (width 64, batch 512, bf16, eager)", 0.297 * 503e12)
DECODE_PER_WORKER = 150  # ImageNet images/s that one DataLoader worker decodes and crops (PIL; 100-250 measured)
AA_STEPS = 1000  # AutoAttack standard, roughly: APGD-CE 100 steps + APGD-T 9 targets x 100, per image (a bound)
DATASET_SIZES = dict(cifar10=(50_000, 10_000), cifar100=(50_000, 10_000), imagenet=(1_281_167, 50_000), synthetic=(2_560, 512))

def command_flops(a, r, pieces):
    """(FLOPs, ImageNet decode-bound hours) of one train/finetune-bn/eval/tradeoff command `a` on run `r`'s model."""
    key = (r.arch, r.dataset, r.width, r.image_size, method_k(r.method, r.k))
    if key not in pieces:  # per image: counted on 2 images at the run's resolution
        hw = r.image_size if r.dataset == "imagenet" else 32
        net = build_model(r.arch, 1000 if r.dataset == "imagenet" else 10, key[-1], r.width, r.dataset)
        pieces[key] = [f / 2 for f in piece_flops(net, torch.rand(2, 3, hw, hw), torch.zeros(2, dtype=torch.long))]
    (train, attack), (n_train, n_test) = pieces[key], DATASET_SIZES[r.dataset]
    if a.command in ("train", "finetune-bn"):
        images = (a.subset or r.subset or n_train) * a.epochs
        flops = images * (method_flops(r.method, train, attack, r.attack_steps, r.k, r.robmask_adv_only)
                          if a.command == "train" else train + (attack * r.attack_steps if a.finetune_on == "adv" else 0))
        return flops, images / (DECODE_PER_WORKER * r.workers) / 3600 if r.dataset == "imagenet" else 0.0
    rows = [0.0] if getattr(a, "attack", "pgd") == "none" else (a.eps if a.command == "eval" else [0.0, a.eps] * len(a.p))
    steps = AA_STEPS if getattr(a, "attack", "") == "autoattack" else a.steps
    return sum((a.n or n_test) * (train / 3 + (steps * attack if e > 0 else 0)) for e in rows), 0.0  # forward ≈ 1/3

def cmd_cost(args):
    """Reads `run_all.sh --dry-run` output: per stage, the FLOPs of its train/finetune-bn/eval/tradeoff commands (counted
    per image on the real models) and their GPU-hours on COST_DEVICE (a lower bound at batch 128, measured at 512)."""
    import shlex
    if not os.path.isfile(args.commands):
        die(f"{args.commands} is not a file; save `bash run_all.sh --dry-run` output there first")
    runs, pieces, totals, stage, seen = {}, {}, {}, None, set()
    for line in open(args.commands, encoding="utf-8"):
        if line.startswith("== stage "):
            stage = line.split()[-1]
            totals.setdefault(stage, [0.0, 0.0, 0])  # (a stage whose runs an earlier one made shows 0)
        argv = shlex.split(line[2:]) if line.startswith("+ ") and " robmask.py " in line else []
        argv = argv[argv.index("robmask.py") + 1:] if argv else []
        if not argv or argv[0] not in ("train", "finetune-bn", "eval", "tradeoff") or stage is None or line in seen:
            continue  # (a run that several stages need is counted once, in the first)
        seen.add(line)
        a = make_parser().parse_args(argv)
        if a.command == "train": validate(a)
        # the run a command reads: the train command (earlier in the output) that wrote its checkpoint
        r = a if a.command == "train" else runs.get(os.path.normpath(os.path.dirname(a.ckpt)))
        if r is None: continue
        if a.command in ("train", "finetune-bn"): runs[os.path.normpath(a.out)] = r
        t, (flops, loader) = totals[stage], command_flops(a, r, pieces)
        t[0], t[1], t[2] = t[0] + flops, t[1] + loader, t[2] + 1
    log(f"Estimated cost at this scale, from counted FLOPs, on {COST_DEVICE[0]} (eval: PGD as counted, AutoAttack as "
        f"{AA_STEPS} attack steps per image; ImageNet loader bound: {DECODE_PER_WORKER} img/s per worker):")
    log(f"  {'stage':8s} {'commands':>8s} {'PFLOP':>10s} {'GPU-hours':>10s} {'decode-bound GPU-hours':>23s}")
    for name, (flops, loader, count) in list(totals.items()) + [("all", [sum(t[i] for t in totals.values()) for i in range(3)])]:
        log(f"  {name:8s} {count:8d} {flops / 1e15:10.1f} {flops / COST_DEVICE[1] / 3600:10.2f} "
            f"{f'{loader:.1f}' if loader and name != 'all' else '-':>23s}")
    return totals

# ---- 5.6 Figures (matplotlib, imported only here) -------------------------------------------------
FIG_DPI, FIG_SIZES = 100, {"bn-params": (12, 3), "feature-maps": (12, 6), "curves": (6, 4), "tradeoff": (6, 4)}

def bn_tensors(model, layer):
    """(running mean, running var, γ, β) of the layer-th masked BN layer (1-based), clean basis u(0)."""
    layers = masked_layers(model)
    if not 1 <= layer <= len(layers):
        die(f"--layer {layer} is out of range: the model has {len(layers)} BN layers (1..{len(layers)})")
    m = layers[layer - 1]; set_mask(model, encode(0.0, m.k))  # every layer shares k; read at the clean basis u(0)
    return [t.detach() for t in (*m.eval_stats(), m.mix(m.W), m.mix(m.Wp))]

def plot_bn_params(args, fig):
    """Figure 1: running mean, running var, γ and β of one BN layer, for two checkpoints."""
    axes = fig.subplots(1, 4)
    for path, color in ((args.ckpt_a, "tab:blue"), (args.ckpt_b, "tab:orange")):
        model, _ = load_checkpoint(path)
        for ax, t, name in zip(axes, bn_tensors(model, args.layer), ("running mean μ", "running var σ²", "γ", "β")):
            ax.plot(t.numpy(), color=color, lw=1, label=os.path.basename(os.path.dirname(os.path.abspath(path))))
            ax.set(title=name, xlabel="channel")
    axes[0].legend(fontsize=7)

def first_bn_relu(model, x):
    """Activations after the first BN + ReLU (where §3.1 looks), for one image."""
    out = {}
    hook = masked_layers(model)[0].register_forward_hook(lambda m, i, o: out.setdefault("a", F.relu(o)))
    with torch.no_grad(): model(x)
    hook.remove()
    return out["a"][0]

def plot_feature_maps(args, fig):
    """Figure 4: the channels after the first BN+ReLU of two models, side by side; red boxes mark channels blocked (all
    zero) in one model but not the other, green boxes channels magnified (mean activation over 2x the other model's)."""
    from matplotlib.patches import Rectangle
    models = [load_checkpoint(p) for p in (args.ckpt_a, args.ckpt_b)]
    if any(models[0][1][key] != models[1][1][key] for key in ("arch", "width", "dataset")):
        die(f"{args.ckpt_a} and {args.ckpt_b} differ in architecture, width or dataset; channel i of one is not "
            "channel i of the other: compare a model with its finetune-bn copy")
    data = eval_data(args, models[0][1], torch.device("cpu"))
    x = next(itertools.islice(data.test_batches(1), args.image, None), (None,))[0]  # image I, one at a time
    if x is None: die(f"--image {args.image} is out of range: the test set has fewer images")
    acts = [first_bn_relu(fixed_mask(m, 0.0), x) for m, _ in models]
    (c, h, w), means = acts[0].shape, [a.mean((1, 2)) for a in acts]
    side = math.ceil(math.sqrt(c))
    for i, (ax, a) in enumerate(zip(fig.subplots(1, 2), acts)):  # one tile per channel, side × side
        grid = F.pad(a / (a.max() + 1e-12), (0, 1, 0, 1))  # (a one-pixel gap after each tile)
        grid = F.pad(grid, (0, 0, 0, 0, 0, side * side - c)).view(side, side, h + 1, w + 1).permute(0, 2, 1, 3)
        ax.imshow(grid.reshape(side * (h + 1), side * (w + 1)).numpy(), cmap="gray")
        for ch in range(c):
            blocked = a[ch].max() == 0 and acts[1 - i][ch].max() > 0
            if blocked or means[i][ch] > 2 * means[1 - i][ch]:
                r, q = divmod(ch, side)
                ax.add_patch(Rectangle((q * (w + 1) - 0.5, r * (h + 1) - 0.5), w, h, fill=False, lw=1.5,
                                       edgecolor="red" if blocked else "lime"))
        ax.set_title(os.path.basename(os.path.dirname(os.path.abspath((args.ckpt_a, args.ckpt_b)[i]))), fontsize=8)
        ax.axis("off")
    fig.suptitle("after the first BN+ReLU: red = blocked here only, green = magnified >2x here")

def read_log(run_dir):
    """The epochs of a run's log.jsonl: a list of dicts with a numeric epoch and test_acc."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path): die(f"{run_dir} has no log.jsonl; pass run directories written by `robmask.py train`")
    rows = read_json(path, lines=True)
    if not rows: die(f"{path} has no epochs yet (an --epochs 0 run, or one stopped in its first epoch)")
    if not all(isinstance(r, dict) and all(isinstance(r.get(key), (int, float)) for key in ("epoch", "test_acc"))
               for r in rows):
        die(f"{path} is not a robmask training log (each line needs epoch and test_acc)")
    return rows

def plot_curves(args, fig):
    """Figure 3: clean test accuracy per epoch (solid) and clean training accuracy (dashed, where logged), one line per
    run; runs whose names differ only in their -s<seed> suffix are one line, their mean epoch by epoch."""
    ax, groups = fig.subplots(), {}
    for run in args.runs:
        groups.setdefault(re.sub(r"-s\d+$", "", os.path.basename(os.path.normpath(run))), []).append(read_log(run))
    for name, logs in groups.items():
        n = min(map(len, logs))  # the epochs that every seed has
        mean = lambda key: [100 * sum(log[i][key] for log in logs) / len(logs) for i in range(n)]  # noqa: E731
        epochs = [logs[0][i]["epoch"] for i in range(n)]
        line, = ax.plot(epochs, mean("test_acc"), label=name + (f" (mean of {len(logs)})" if len(logs) > 1 else ""))
        if all(isinstance(log[i].get("train_acc"), (int, float)) for log in logs for i in range(n)):
            ax.plot(epochs, mean("train_acc"), linestyle="--", color=line.get_color())  # the gap: the overfitting
    ax.set(xlabel="epoch", ylabel="clean accuracy (%): test solid, training dashed")
    ax.legend(fontsize=7)

def plot_tradeoff(args, fig):
    """Clean against robust accuracy along p, one line per tradeoff JSON."""
    ax = fig.subplots()
    for path in args.files:
        res = read_json(path)
        rows = res.get("rows") if isinstance(res, dict) else None
        if not rows or not all(isinstance(r, dict) and all(isinstance(r.get(q), (int, float)) for q in ("p", "clean", "robust"))
                               for r in rows):
            die(f"{path} is not a `robmask.py tradeoff` result (it needs rows of p, clean, robust)")
        ax.plot([100 * r["clean"] for r in rows], [100 * r["robust"] for r in rows], marker="o", label=os.path.basename(path))
        for r in rows: ax.annotate(f"{r['p']:.1f}", (100 * r["clean"], 100 * r["robust"]), fontsize=6)
    ax.set(xlabel="clean accuracy (%)", ylabel="PGD accuracy (%)")
    ax.legend(fontsize=7)

PLOTS = {"bn-params": plot_bn_params, "feature-maps": plot_feature_maps, "curves": plot_curves, "tradeoff": plot_tradeoff}

def cmd_plot(args):
    args.out = check_out(args.out, "png", args.force)
    from matplotlib.figure import Figure  # no pyplot and no GUI backend: the figure is only saved
    fig = Figure(figsize=FIG_SIZES[args.kind], layout=None if args.kind == "feature-maps" else "tight")
    PLOTS[args.kind](args, fig)
    atomic_write(args.out, lambda f: fig.savefig(f, format="png", dpi=FIG_DPI))
    log(f"wrote {args.out}")

# ---- 5.7 report: RESULTS.md from a runs folder written by run_all.sh ---------------------------
# The run names are the contract with run_all.sh: <dataset>-<arch>-<method>-<short|long>-s<seed>,
# fine-tuned copies add -ft-<on>-<params>. Evaluations sit beside the checkpoints as eval-*.json.
# Every claim line restates the paper's text (its tables lost their numbers) in our own words.
CLAIMS = {
    1: "Fine-tuning only BN moves a model along the trade-off: a standard model gains robustness from BN tuned on PGD examples, "
       "an adversarial one regains clean accuracy (and loses robustness) from BN tuned clean; γ does it, μ, σ² barely change.",
    2: "Mixing two BN maskings as (1-p)(γ,β) + p(γ',β') gives a smooth family of trade-offs from one stored model.",
    3: "RobMask beats BN by about 1.5 points and AdvProp by about 0.8 on CIFAR-10 at 100 epochs, similar gains on CIFAR-100; "
       "RobMask at 20 epochs is comparable to BN at 100.", 4: "On ImageNet ResNet-18, AdvProp barely helps; RobMask adds about 0.4 points.",
    5: "Under PGD-100, RobMask beats AdvProp and adversarial training at every ε up to 6/255 and is slightly worse at 8/255, the "
       "strength those two were trained on.",
    6: "AutoAttack tells the same story as PGD; with ε_max = 10/255 RobMask trades a little clean accuracy for better robustness "
       "at ε ≥ 6/255.", 7: "AdvProp with a random strength gets worse, extra auxiliary BNs help a little, and RobMask beats all of them.",
    8: "RobMask's gains hold over three random seeds."}

class Runs:
    """A runs folder written by run_all.sh, read defensively: a missing or malformed file makes a "not run" cell."""
    def __init__(self, root):
        self.root, self.notes = root, []  # notes: runs whose numbers are not final (partial) or not theirs (stale)
    def json(self, path, lines=False):
        """A file under the runs folder, or None when it is missing; an unreadable one is None with a warning."""
        path = os.path.join(self.root, path)
        try: return read_json(path, lines) if os.path.isfile(path) else None
        except UserError as e: return warn(f"{e}: its cells show as not run")  # (None)
    def rows(self, path, keys):
        """The rows of a result file that carry numeric `keys` (malformed ones are skipped, with a warning)."""
        res = self.json(path, lines=path.endswith(".jsonl"))
        rows = res if isinstance(res, list) else res.get("rows") if isinstance(res, dict) else None
        if res is not None and not isinstance(rows, list):  # a number, a string, a boolean, an object...
            warn(f"{os.path.join(self.root, path)} has no list of rows: its cells show as not run")
            return []
        good = [r for r in rows or [] if isinstance(r, dict) and all(
            isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for key in keys)]
        if res is not None and len(good) < len(rows or [1]):
            warn(f"{os.path.join(self.root, path)} has rows without {', '.join(keys)}: skipped")
        return good
    def seeds(self, name):
        """Run directories name-s0, name-s1, ... that hold a log."""
        pat = re.compile(re.escape(name) + r"-s\d+$")
        return sorted(os.path.join(self.root, d) for d in os.listdir(self.root)
                      if pat.match(d) and os.path.isfile(os.path.join(self.root, d, "log.jsonl")))
    def log(self, d): return self.rows(os.path.join(os.path.basename(d), "log.jsonl"), ("test_acc", "seconds"))
    def args(self, d): return a if isinstance(a := self.json(os.path.join(os.path.basename(d), "args.json")), dict) else {}
    def unfinished(self, d):
        """'partial: E/N ep' for a run that stopped before its last epoch, else None."""
        n, want = len(self.log(d)), self.args(d).get("epochs")
        return f"partial: {n}/{want} ep" if isinstance(want, int) and n < want else None
    def derailed(self, d):  # issue 31: a branch's epoch-mean loss passed 2 ln 10 (twice a uniform guess's), or it stopped short
        losses = [v for e in self.log(d) for v in (e["branch_loss"] if isinstance(e.get("branch_loss"), list) else [e.get("train_loss")])]
        return bool(self.unfinished(d)) or any(isinstance(v, (int, float)) and v > 2 * math.log(10) for v in losses)
    def counts(self, d, file=None):
        """Whether run d's numbers (its log, or its evaluation `file`) count; notes a partial run and leaves out an
        evaluation of weights that the run no longer holds (retrained since: another run_id)."""
        res, rows = self.json(os.path.join(os.path.basename(d), file)) if file else None, self.json(
            os.path.join(os.path.basename(d), "log.jsonl"), lines=True)
        if isinstance(res, dict) and "run_id" in res and isinstance(rows, list) and self.args(d) and \
                res["run_id"] != run_id(self.args(d), rows):
            self.notes.append(f"{os.path.basename(d)}/{file}: stale (the run was retrained after it), left out")
            return False
        if self.unfinished(d): self.notes.append(f"{os.path.basename(d)}: {self.unfinished(d)}")
        return True
    def cell(self, values, name=None):
        values = [v for v in values if v is not None]
        flag = " (partial)" if name and any(self.unfinished(d) for d in self.seeds(name)) else ""
        if not values: return "not run"
        mean = sum(values) / len(values)
        if len(values) == 1: return f"{100 * mean:.2f}{flag}"
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        return f"{100 * mean:.2f} ± {100 * std:.2f} (n={len(values)}){flag}"
    def per_seed(self, name, file, eps):
        """{seed: accuracy at ε} from the eval JSON `file` of every seed of run `name` (stale ones left out)."""
        return {int(d.rsplit("-s", 1)[1]): r["accuracy"] for d in self.seeds(name) if self.counts(d, file)
                for r in self.rows(os.path.join(os.path.basename(d), file), ("eps", "accuracy")) if abs(r["eps"] - eps) < 1e-9}
    def value(self, cell):
        """A table cell from its spec: text as it is, ("final", run): the last epoch's test accuracy, or
        ("eval", run, file, ε): the evaluation's accuracy at ε; mean ± std over the run's seeds."""
        if isinstance(cell, str): return cell
        if cell[0] == "eval": return self.cell(list(self.per_seed(*cell[1:]).values()), cell[1])
        logs = [self.log(d) for d in self.seeds(cell[1]) if self.counts(d)]
        return self.cell([log[-1]["test_acc"] for log in logs if log], cell[1])
    def attack(self, file, default):
        """How the evaluations in `file` attacked, e.g. 'PGD-100' or 'AutoAttack (standard)'."""
        for d in sorted(os.listdir(self.root)):
            if rows := self.rows(os.path.join(d, file), ("eps", "accuracy")):
                aa = res.get("aa", "?") if isinstance(res := self.json(os.path.join(d, file)), dict) else "?"
                return f"PGD-{rows[-1].get('steps')}" if rows[-1].get("attack") == "pgd" else f"AutoAttack ({aa})"
        return default

def paper_tables(R):
    """The paper's tables as data, in its order: (number, title, header, rows); a cell is text or a spec for R.value."""
    b, e8, sweep, three = "cifar10-resnet18", 8 / 255, [i / 255 for i in range(9)], ("bn", "advprop", "robmask")
    t1 = [("standard", "bn-long"), ("standard + BN fine-tuned on PGD (γ,β; μ,σ² re-estimated)", "bn-long-ft-adv-affine"),
          ("adversarial", "adv-long"), ("adversarial + BN fine-tuned clean (γ,β; μ,σ² re-estimated)", "adv-long-ft-clean-affine"),
          ("adversarial + γ fine-tuned clean (μ,σ² re-estimated)", "adv-long-ft-clean-gamma"),
          ("adversarial + γ fine-tuned clean (μ,σ² frozen)", "adv-long-ft-clean-gamma-frozen"),
          ("adversarial + β fine-tuned clean (μ,σ² re-estimated)", "adv-long-ft-clean-beta"),
          ("adversarial + μ,σ² re-estimated clean (no gradient step)", "adv-long-ft-clean-stats")]
    t2 = R.rows("table2-tradeoff.json", ("p", "clean", "robust"))
    epochs = {n: next((R.args(d).get("epochs") for d in R.seeds(f"cifar10-preactresnet18-bn-{n}")), None) or "?"
              for n in ("short", "long")}
    t56 = [("adversarial", "adv"), ("AdvProp", "advprop"), ("RobMask", "robmask")]
    seeds = R.seeds("cifar10-preactresnet18-robmask-long")
    return [
        (1, f"ResNet-18 on CIFAR-10, BN fine-tuning ({R.attack('eval.json', 'PGD')} at ε=8/255, mask clean)",
         ["model", "clean", "PGD 8/255"], [[label, ("eval", f"{b}-{r}", "eval.json", 0.0), ("eval", f"{b}-{r}", "eval.json", e8)]
                                           for label, r in t1]),
        (2, "Trade-off slider between the adversarial model's BN (p=0) and its clean-fine-tuned BN (p=1)", ["p", "clean", "PGD"],
         [[f"{r['p']:.1f}", f"{100 * r['clean']:.2f}", f"{100 * r['robust']:.2f}"] for r in t2] or [["not run"] * 3]),
        (3, "clean test accuracy, CIFAR-10/100", ["dataset", "arch"] + [f"{m} {n} ({e} ep)" for n, e in epochs.items()
                                                                        for m in ("BN", "AdvProp", "RobMask")],
         [[ds, arch] + [("final", f"{ds}-{arch}-{m}-{n}") for n in epochs for m in three]
          for ds in ("cifar10", "cifar100") for arch in ("preactresnet18", "resnext29", "densenet121")]),
        (4, "ImageNet, ResNet-18, top-1", ["BN", "AdvProp", "RobMask"], [[("final", f"imagenet-resnet18-{m}-long") for m in three]]),
        (5, f"ResNet-18 CIFAR-10, {R.attack('eval-pgd.json', 'PGD')} accuracy, mask matched to ε",
         ["method"] + [f"{i}/255" for i in range(9)], [[label] + [("eval", f"{b}-{m}-long", "eval-pgd.json", e) for e in sweep]
                                                       for label, m in t56]),
        (6, f"ResNet-18 CIFAR-10, {R.attack('eval-aa.json', 'AutoAttack')} accuracy, mask matched to ε",
         ["method"] + [f"{i}/255" for i in range(9)], [[label] + [("eval", f"{b}-{m}-long", "eval-aa.json", e) for e in sweep]
                                                       for label, m in t56 + [("RobMask ε_max=10/255", "robmask-eps10")]]),
        (7, "DenseNet-121 CIFAR-10, AdvProp variants", ["method", "clean"],
         [[m, ("final", f"cifar10-densenet121-{m}-long")] for m in ("advprop", "advprop-random", "advprop-multi", "robmask")]),
        (8, "RobMask over seeds (PreActResNet-18, CIFAR-10)", ["runs", "clean"],
         [[", ".join(os.path.basename(d) for d in seeds) or "none", ("final", "cifar10-preactresnet18-robmask-long")]])]

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])

STATS_ROWS = [("BN", "bn", ""), ("AdvProp", "advprop", ""), ("RobMask, mixed", "robmask-mixed", ""),
              ("RobMask, mixed + recalibrate", "robmask-mixed", "-recal"), ("RobMask, split", "robmask-split", ""),
              ("RobMask, shared", "robmask-shared", "")]
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t, 97.5%, df 1..10

def verdict(d):
    """Issue 16's pre-written rule on paired differences d (points): mean, 95% t-interval, and the reading."""
    n = len(d)
    if n < 2: return f"{d[0]:+.2f}" if d else "not run", "", "needs 2 seeds or more"
    mean, t = sum(d) / n, lambda m: T975[m - 2] if m <= 11 else 1.96  # noqa: E731
    sd = (sum((v - mean) ** 2 for v in d) / (n - 1)) ** 0.5
    lo, hi = mean - t(n) * sd / n ** 0.5, mean + t(n) * sd / n ** 0.5
    iv = f"{mean:+.2f}", f"[{lo:+.2f}, {hi:+.2f}]"
    if mean >= 1 and lo > 0: return *iv, "supports the claim at this scale"
    if mean <= 0 and hi < 0.5: return *iv, "refutes it at this scale"
    if lo > 0: return *iv, "undecided: the interval excludes 0, but a mean under +1 cannot support the claim"
    gap, goal = (0.5 - mean, "fall below +0.5") if mean <= 0 else (mean, "exclude 0")  # the rule's projection: the n at which
    more = next((m for m in range(n + 1, 101) if t(m) * sd / m ** 0.5 < gap), None)  # the interval would exclude 0 (or fall below +0.5)
    return *iv, f"undecided: about {more} seeds would {goal}" if more else "undecided at any number of seeds near this mean"

def paired(label_a, a, label_b, b):
    """A row of paired per-seed differences a − b (points) of two {seed: accuracy} maps, read by the rule."""
    d = [100 * (a[s] - b[s]) for s in sorted(set(a) & set(b))]
    return (f"{label_a} − {label_b}", ", ".join(f"s{s}: {v:+.2f}" for s, v in zip(sorted(set(a) & set(b)), d)) or "not run",
            *verdict(d))

def stats_section(R, out):
    """The --bn-stats study of run_all.sh's `stats` stage: mean ± std over seeds, and paired differences."""
    name = "cifar10-preactresnet18-stats-{}".format
    cols = [("eval-clean{}.json", 0.0), ("eval-pgd20-clean{}.json", 8 / 255), ("eval-pgd20-matched{}.json", 8 / 255)]
    rows = [[label] + [R.value(("eval", name(v), f.format(sfx), e)) for f, e in cols] for label, v, sfx in STATS_ROWS]
    clean = {label: R.per_seed(name(v), f"eval-clean{sfx}.json", 0.0) for label, v, sfx in STATS_ROWS}
    out += ["## Study: how masked BN keeps its running statistics (`--bn-stats`, run_all.sh stage `stats`)", "",
            "*Question (not in the paper):* which statistics rule gives RobMask the best clean accuracy at u(0)? "
            "PreActResNet-18, the same data, schedule and seeds for every row.", "",
            table(["method", "clean, u(0), whole test set", "PGD-20 8/255, clean mask", "PGD-20 8/255, matched mask"],
                  rows), "", "Paired differences in clean accuracy (points), per seed:", "",
            table(["difference", "per seed", "mean", "95% t-interval", "reading"],
                  [paired(a, clean[a], b, clean[b]) for a, *_ in STATS_ROWS[2:] for b in ("BN", "AdvProp")]), ""]

def regime_section(R, out):
    """The overfitting-regime study of run_all.sh's `regime` stage: per arm, mean ± std and paired differences."""
    big_e = next((int(m[1]) for d in sorted(os.listdir(R.root)) if (m := re.match(r"cifar10-preactresnet18-regime-bn-e(\d+)-s\d+$", d))), None)
    if big_e is None: return
    name = "cifar10-preactresnet18-regime-{}".format
    out += ["## Study: where BN overfits (run_all.sh stage `regime`)", "", f"*Question:* does RobMask beat BN and "
            f"AdvProp in clean accuracy where BN fits its training set? E = {big_e} epochs; paired over seeds.", ""]
    for tag, eps, label in (("eps8", 8 / 255, "ε_max 8/255, PGD-7"), ("eps2", 2 / 255, "ε_max 2/255, PGD-2")):
        arms = [("BN", f"bn-e{big_e}"), ("AdvProp", f"advprop-{tag}-e{big_e}"), ("RobMask", f"robmask-{tag}-e{big_e}"),
                (f"RobMask, E/5 = {big_e // 5} epochs", f"robmask-{tag}-e{big_e // 5}"), ("BN, compute-matched to RobMask", f"bn-{tag}-matched")]
        clean, rows = {lbl: R.per_seed(name(v), "eval-clean.json", 0.0) for lbl, v in arms}, []
        for lbl, v in arms:
            logs = [log for log in map(R.log, R.seeds(name(v))) if log]
            rows.append([lbl, R.cell(list(clean[lbl].values())), R.value(("eval", name(v), f"eval-pgd20-{tag}.json", eps)),
                         R.cell([log[-1].get("train_acc") for log in logs]), ", ".join(str(len(log)) for log in logs) or "-",
                         f"{sum(R.derailed(d) for d in R.seeds(name(v)))} of {len(R.seeds(name(v)))}"])
        out += [f"### {label}", "", table(["method", "clean, u(0), whole test set", f"PGD-20 {round(eps * 255)}/255, matched "
                                           "mask", "final train acc", "epochs per seed", "derailed (or stopped short)"], rows), "",
                table(["difference (points)", "per seed", "mean", "95% t-interval", "reading"],
                      [paired(arms[a][0], clean[arms[a][0]], arms[b][0], clean[arms[b][0]])
                       for a, b in ((2, 0), (2, 1), (3, 0), (2, 4))]), ""]

SWEEP_RUN = r"(\w+)-(mixed|split|shared)-s(\d+)"  # results/split-cpu/sweep.sh's <variant>-<bn-stats mode>-s<seed>

def sweep_section(R, out):
    """The split sweep (results/split-cpu/sweep.sh): each run's first epoch. A step's summed loss follows from the running
    means that --log-every 0 prints, L_k = k m_k - (k-1) m_(k-1) (in <run>/train.log or <run>.log). A run diverged if a
    step's loss passed twice the two-branch chance level 2 ln 10 = 4.61, or NaN (a run without epoch 1 counts as one)."""
    runs, chance, med = {}, 2 * math.log(10), lambda v: sorted(v)[len(v) // 2] if v else math.nan  # noqa: E731
    nan_last = lambda v: (v != v, v)  # noqa: E731  (a NaN ranks as the largest loss)
    for d in sorted(os.listdir(R.root)):
        logs = [f for f in (os.path.join(R.root, d, "train.log"), os.path.join(R.root, d + ".log")) if os.path.isfile(f)]
        if not (m := re.fullmatch(SWEEP_RUN, d)) or not logs: continue
        means = {int(k): float(v) for k, v in re.findall(r"epoch 1 step (\d+)/\d+  loss (\S+)", open(logs[0], encoding="utf-8", errors="replace").read())}
        worst = max((k * v - (k - 1) * means.get(k - 1, 0.0) for k, v in means.items()), key=nan_last, default=math.nan)
        runs.setdefault(m.group(1, 2), []).append((int(m[3]), worst, (R.log(d) or [{}])[0]))  # (seed, worst step, epoch 1)
    rows = []
    for (variant, mode), rs in sorted(runs.items()):
        ep1, (seed, worst, _) = [e for *_, e in rs if "branch_loss" in e], max(rs, key=lambda r: nan_last(r[1]))
        loss = [e["train_loss"] for e in ep1]
        rows.append([variant, mode, len(rs), sum(not w <= 2 * chance for _, w, _ in rs),
                     sum(not e.get("train_loss", math.nan) <= chance for *_, e in rs), f"{med(loss):.3f} [{min(loss, default=math.nan):.3f}, "
                     f"{max(loss, default=math.nan):.3f}]", " / ".join(f"{med([e['branch_loss'][i] for e in ep1]):.3f}" for i in (0, 1)),
                     f"{worst:.2f} (s{seed})", f"{100 * med([e['test_acc'] for e in ep1]):.1f}"])
    if rows: out += ["## Study: the split sweep, first epochs (results/split-cpu/sweep.sh)", "", table(
        ["variant", "mode", "seeds", "diverged (a step > 9.21)", "epoch-1 mean > 4.61", "epoch-1 loss, median [min, max]",
         "clean / adversarial CE, median", "worst step loss", "test acc after epoch 1, median"], rows), ""]

def cmd_report(args):
    if not os.path.isdir(args.runs):
        die(f"{args.runs} is not a folder; pass the runs folder that run_all.sh wrote (e.g. runs/quick)")
    path = check_out(args.out or os.path.join(args.runs, "RESULTS.md"), "report", args.force)
    R, names = Runs(args.runs), os.listdir(args.runs)
    out = ["# Results", "", f"Built by `python robmask.py report {args.runs}` from the runs in that folder. "
           "Accuracies in %. \"not run\" marks a run that is missing; several seeds show mean ± std.", ""]
    studies = [d for d in names if re.match(rf"cifar10-preactresnet18-(stats|regime)-|{SWEEP_RUN}$", d)]
    paper = any(re.match(r"(cifar10|cifar100|imagenet)-\w+-(bn|adv|robmask)", d) for d in names) or not studies  # else: the studies
    for n, title, header, rows in paper_tables(R) if paper else []:
        out += [f"## Table {n}: {title}", "", f"*Paper's claim:* {CLAIMS[n]}", "",
                table(header, [[R.value(cell) for cell in row] for row in rows]), ""]
    secs = {m: [sum(e["seconds"] for e in log) / len(log) for log in map(R.log, R.seeds(f"cifar10-densenet121-{m}-long"))
                if log] for m in ("advprop", "robmask")}
    if paper: out += ["## Timing: seconds per epoch, DenseNet-121 CIFAR-10", "",
                      "*Paper's claim:* both use two forwards and one backward per step; 870 s (AdvProp) vs 890 s (RobMask).",
                      "", table(["AdvProp", "RobMask"], [[f"{sum(v) / len(v):.1f}" if v else "not run" for v in secs.values()]]), ""]
    if paper or any("-stats-" in d for d in studies): stats_section(R, out)
    regime_section(R, out)
    sweep_section(R, out)
    figs = {f: os.path.isfile(os.path.join(args.runs, "figures", f)) for f in ("fig1-bn-params.png", "fig3-curves.png",
            "fig4-feature-maps.png", "table2-tradeoff.png", "stats-curves.png", "regime-curves.png")}
    if R.notes:  # what is not final, said once per run
        out += ["## Not final", "", "Cells marked (partial) include runs that stopped before their last epoch; stale "
                "evaluations were left out:", ""] + [f"- {n}" for n in dict.fromkeys(R.notes)] + [""]
    if paper or any(figs.values()):
        out += ["## Figures", ""] + [f"- [{f}](figures/{f})" if made else f"- {f}: not run" for f, made in figs.items() if paper or made]
    atomic_write(path, lambda f: f.write(("\n".join(out) + "\n").encode()))
    log(f"wrote {path}")

# ==== Plumbing: checkpoint files, run folders, the command line. A reader may skip to the end =======================
# Nothing below is in the paper. It makes bad input one line, never a traceback, and makes an interrupted run lose nothing.
# ---- Files: every file robmask writes is checked first, written atomically, and read back with one-line errors
def head(path, n=None):
    """The first n bytes of a file (all for n=None), or b"" when it cannot be read."""
    try:
        with open(path, "rb") as f: return f.read(n)
    except OSError: return b""

def json_keys(path):
    """The top-level keys of a JSON object file (empty for anything else): how a writer knows its own files."""
    try: obj = json.loads(head(path) or b"0")
    except ValueError: return set()
    return set(obj) if isinstance(obj, dict) else set()

def own_export(path):
    """An earlier export: a robmask checkpoint that says so, or a torchvision state_dict with its own sidecar."""
    try: ckpt = {} if {"arch", "u", "source"} <= json_keys(path + ".json") else torch.load(path, "cpu", weights_only=True)
    except Exception: return False
    return ckpt == {} or isinstance(ckpt, dict) and ckpt.get("format") in (FORMAT, OLD_FORMAT) and "exported_from" in (ckpt.get("args") or {})

# What each writer recognises as a file it wrote itself, and may replace without --force
OWN = {"results": lambda p: bool({"rows", "step_seconds"} & json_keys(p)),  # eval, tradeoff, bench
       "sidecar": lambda p: {"arch", "u", "source"} <= json_keys(p), "export": own_export,
       "png": lambda p: head(p, 8) == b"\x89PNG\r\n\x1a\n", "report": lambda p: head(p, 10) == b"# Results\n"}

def check_out(path, kind, force=False, flag="--out"):
    """Every file robmask writes passes here first, before any work. A writer replaces only a regular file of its own kind
    (OWN[kind]), or any with --force; never a folder, device, pipe or link. Makes a missing folder, proves it writable."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        die(f"{flag} {path} names a folder; give a file name (inside it, or beside it)")
    path = os.path.abspath(path)
    if os.path.lexists(path):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            die(f"{flag} {path} exists and is not a regular file (a device, pipe or link); robmask replaces only "
                "regular files: choose another name")
        if not force and not OWN[kind](path):
            die(f"{flag} {path} exists and is not a {kind} file that robmask wrote; refusing to replace it: choose "
                "another name, or pass --force")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tempfile.TemporaryFile(dir=os.path.dirname(path)).close()  # can we create a file there?
    except OSError as e: die(f"cannot write {flag} {path}: {e.strerror or e}")
    return path

def atomic_write(path, write):
    """A temporary file in the same folder, flushed, fsynced, renamed over `path`, the folder fsynced: a kill leaves the
    old file or the new one, never half; a failed write (disk full) leaves the old file, no temporary one, one line."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp, fd = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}"), None
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        die(f"could not write {path}: {getattr(e, 'strerror', None) or str(e).splitlines()[0][:160]}; the previous "
            "version, if any, is intact")
    finally:
        if fd is not None: os.close(fd)
        if os.path.exists(tmp): os.remove(tmp)

def write_json(path, obj):  # allow_nan=False: a NaN would be a bare token that no JSON reader accepts
    try: text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    except ValueError as e: die(f"refusing to write {path}: {e} (a NaN or inf result)")
    atomic_write(path, lambda f: f.write(text.encode()))

def read_json(path, lines=False):
    """A JSON file (or JSON lines), with one-line errors that name the file."""
    try:
        with open(path, encoding="utf-8") as f: text = f.read()
        return [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except OSError as e: die(f"cannot read {path}: {e.strerror or e}")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        die(f"{path} is not valid JSON{' lines' if lines else ''} ({str(e).splitlines()[0][:80]}); was it written by robmask?")

# The stored arguments a checkpoint must have, with their types and ranges: a forged or damaged file with
# the right format tag still gets one line, never a traceback deep inside build_model.
CKPT_ARGS = {"arch": (str, lambda v: v in ARCHS or v in torchvision_archs()), "method": (str, lambda v: v in METHODS),
             "k": (int, lambda v: 1 <= v <= MAX_K), "width": (int, lambda v: 1 <= v <= MAX_WIDTH),
             "num_classes": (int, lambda v: v >= 1), "dataset": (str, lambda v: v in MEAN_STD),
             "eps_max": ((int, float), lambda v: 0 <= v <= 1), "bn_stats": (str, lambda v: v in BN_STATS)}

def read_checkpoint(path):
    """torch.load with weights_only=True (tensors and plain Python only), with one-line errors."""
    if os.path.isdir(path): path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        die(f"checkpoint {path} does not exist; train one with `robmask.py train --out DIR` and pass DIR/checkpoint.pt")
    try: ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"(?:Unsupported global|GLOBAL)[^\n]*", str(e))
        die(f"{path} holds pickled code ({what.group(0) if what else 'a non-tensor object'}); refused without "
            "running it. Only weights are loaded: get the checkpoint from its source, or re-save its state_dict")
    except Exception as e:
        die(f"{path} is truncated or corrupt ({type(e).__name__}: {(str(e) or 'no detail').splitlines()[0][:120]}); re-run the "
            "training with --resume (it restarts from the last good checkpoint) or restore a copy")
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (FORMAT, OLD_FORMAT) or "model" not in ckpt:
        die(f"{path} is not a robmask checkpoint (no format '{FORMAT}'); robmask only loads files it wrote")
    if not isinstance(a := ckpt.get("args"), dict) or not isinstance(ckpt["model"], dict) or not all(
            isinstance(t, torch.Tensor) for t in ckpt["model"].values()):
        die(f"{path} is corrupt or foreign: its args or model entry is not what robmask writes")
    a.setdefault("bn_stats", "mixed")  # checkpoints from before --bn-stats kept them `mixed`
    for key, (kind, ok) in CKPT_ARGS.items():
        v = a.get(key)
        if not isinstance(v, kind) or isinstance(v, bool) or not ok(v):
            die(f"{path} is corrupt or foreign: its stored {key} is {v!r}; robmask only loads files it wrote")
    if ckpt["format"] == OLD_FORMAT and a["arch"] in REBUILT:
        die(f"{path} holds {a['arch']} as robmask built it before issue 29 (PreActResNet-18 without its final BN-ReLU, "
            "ResNeXt-29 with a 1x1 stem); retrain it, or read it with robmask.py of commit a6e8375")
    return ckpt

def load_state(model, state, path, what):
    """load_state_dict, but a mismatch is one sentence naming it instead of a wall of keys."""
    own = model.state_dict()
    for key, t in own.items():
        if key not in state: die(f"{path} does not fit {what}: it has no tensor {key} (a checkpoint of another architecture?)")
        if state[key].shape != t.shape:
            die(f"{path} does not fit {what}: {key} is {tuple(state[key].shape)} in the checkpoint but "
                f"{tuple(t.shape)} in the model (another k, width or class count?)")
    if extra := sorted(set(state) - set(own)):
        die(f"{path} does not fit {what}: it has an extra tensor {extra[0]} (a checkpoint of another architecture?)")
    bad = [key for key, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad: die(f"{path} holds non-finite weights (NaN or inf in {bad[0]}); use an earlier checkpoint or retrain")
    model.load_state_dict(state)

def run_id(args, history):
    """A run's identity from args.json and log.jsonl: evaluations record it; report drops one whose run was retrained."""
    return hashlib.sha256(json.dumps([args, history], sort_keys=True).encode()).hexdigest()[:16]

def load_checkpoint(path, device="cpu"):
    """(model in eval mode, args dict) from a robmask checkpoint; args["run_id"] names the weights measured."""
    ckpt = read_checkpoint(path)
    a = dict(ckpt["args"], run_id=run_id(ckpt["args"], ckpt.get("log", [])), run_epoch=ckpt.get("epoch"))
    model = build_model(a["arch"], a["num_classes"], a["k"], a["width"], a["dataset"], a["bn_stats"])
    load_state(model, ckpt["model"], path, f"{a['arch']} (k={a['k']}, {a['num_classes']} classes)")
    return model.to(device).eval(), a

def to_cpu(obj):
    """obj with every tensor in it moved to the CPU: a file written on a GPU loads on a machine without one."""
    if isinstance(obj, dict): return {key: to_cpu(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)): return type(obj)(map(to_cpu, obj))
    return obj.detach().cpu() if torch.is_tensor(obj) else obj

def save_run(out, net, opt, args_json, epoch, history, complete):
    ckpt = to_cpu(dict(format=FORMAT, model=net.state_dict(), args=args_json, epoch=epoch, log=history,
                       complete=complete, optimizer=opt.state_dict() if opt is not None else None))
    atomic_write(os.path.join(out, "checkpoint.pt"), lambda f: torch.save(ckpt, f))
    atomic_write(os.path.join(out, "log.jsonl"),
                 lambda f: f.write("".join(json.dumps(e, allow_nan=False) + "\n" for e in history).encode()))

# ---- Run folders: --resume, --force, one writer per folder
# May change on --resume: where things are, how fast, how loud. The run's identity is its directory's
# contents, not the string that named it, so --out and finetune-bn's source path may differ too.
RUNTIME_KEYS = ("device", "compile", "log_every", "workers", "resume", "force", "check", "data_dir", "out", "source")

def prepare_out_dir(args, given):
    """Apply --resume/--force to --out; the checkpoint to resume from, or None. `given`: the flags typed. Each that
    contradicts the stored run is refused, even when it equals the default; a flag not typed takes the stored value."""
    ck_path = os.path.join(args.out, "checkpoint.pt")
    started = os.path.exists(ck_path) or os.path.exists(os.path.join(args.out, "args.json"))
    if args.resume and os.path.exists(ck_path):
        stored = (ckpt := read_checkpoint(ck_path))["args"]
        for key, flag in sorted(given.items()):  # a flag that contradicts the stored run is an error
            if key in stored and key not in RUNTIME_KEYS and getattr(args, key) != stored[key]:
                die(f"{flag} {getattr(args, key)} differs from the run in {args.out} ({stored[key]}); "
                    "--resume continues the stored run: drop the flag, or use a new --out")
        for key, value in stored.items():  # runtime flags may change; the rest is the stored run
            if key not in RUNTIME_KEYS or getattr(args, key, None) is None: setattr(args, key, value)
        return ckpt
    if args.resume: log(f"no checkpoint in {args.out} yet: starting a new run there")
    elif started and not args.force:
        die(f"--out {args.out} already holds a run; pass --resume to continue it, or --force to overwrite it")
    return None

def lock_run_dir(out):
    """One writer per run directory: an exclusive flock on OUT/.lock, held while the returned file is open."""
    import fcntl
    f = open(os.path.join(out, ".lock"), "a+")
    try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        die(f"--out {out} is in use by another robmask process (pid {f.read().strip() or '?'}); wait, or use another --out")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f

def run_training(args, given, init_from=None):
    """`train` and `finetune-bn` hold the run directory's lock throughout; a directory this process created
    and that fails before its first checkpoint is removed again (only by the lock holder, never a loser)."""
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        die(f"--out {args.out} exists and is not a folder; a run directory must be a folder")
    created, d, rank0, lock = [], os.path.abspath(args.out), int(os.environ.get("RANK", "0")) == 0, None
    while not os.path.exists(d):  # the folders that makedirs is about to create, deepest first
        created, d = created + [d], os.path.dirname(d)
    try:  # (a signal may land anywhere from here on, also before the lock is taken)
        os.makedirs(args.out, exist_ok=True)
        lock = lock_run_dir(args.out) if rank0 else None
        fit(args, given, init_from)
    except BaseException:
        # A second Ctrl-C or SIGTERM is ignored until the clean-up is done (pthread_sigmask is not enough: see its test)
        sigs = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        held = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
        try:
            if created and lock is not None and not os.path.exists(os.path.join(args.out, "checkpoint.pt")):
                for f in ("args.json", ".lock"):
                    with contextlib.suppress(OSError): os.remove(os.path.join(args.out, f))
                for d in created:
                    with contextlib.suppress(OSError): os.rmdir(d)
        finally:
            for s, h in held.items(): signal.signal(s, h)
        raise
    finally:
        if lock is not None: lock.close()

# ---- The command line ------------------------------------------------------------------------------------------
def number(kind, lo, hi=math.inf):
    """An argparse type: a finite int or float in [lo, hi]."""
    def parse(text):
        try: v = kind(text)
        except ValueError: raise argparse.ArgumentTypeError(f"invalid {'integer' if kind is int else 'number'} {text!r}")
        if not (lo <= v <= hi and math.isfinite(v)):  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"{v} must be at least {lo}" if hi == math.inf else f"{v} is outside [{lo}, {hi}]")
        return v
    return parse

def parse_eps(text):
    """'8/255' or '0.0314' -> a float in [0, 1] (pixels live in [0, 1])."""
    num, _, den = str(text).partition("/")
    try: value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: write it as 8/255 or 0.0314")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} = {value:.4g} is outside [0, 1] (pixels are in [0, 1]; e.g. 8/255)")
    return value

def parse_list(item):
    def parse(text):
        values = [item(t) for t in str(text).split(",") if t.strip()]
        if not values: raise argparse.ArgumentTypeError(f"{text!r} is an empty list; give at least one value, e.g. 0,8/255")
        return values
    return parse

def named(kind, names, hint=""):
    """An argparse type: names from a fixed list (a comma list for several), with a one-line error listing them."""
    def parse(text):
        bad = [n for n in parse_list(str)(text) if n not in names]
        if bad: raise argparse.ArgumentTypeError(f"unknown {kind} {bad[0]!r}; choose from {', '.join(names)}{hint}")
        return text
    return parse

def mask_name(text):
    if text in ("clean", "matched"): return text
    try: return str(unit_float(text))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid mask {text!r}; use clean, matched or a number p in [0, 1]")

def device_name(text):
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N")
    return text
positive_int, nonneg_int, unit_float, nonneg_float = number(int, 1), number(int, 0), number(float, 0, 1), number(float, 0)
seed_int = number(int, 0, 2**31 - 1)  # seeds derived from it (seed·100003 + ...) stay within torch's range
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
arch_name = lambda text: named("architecture", ARCHS, " (or 'resnext')")(ARCH_ALIASES.get(text.lower(), text.lower()))  # noqa: E731
ON = dict(action="store_true")
WORKERS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)  # (usable CPUs)
# The flags that several subcommands share, as data: a parent parser is built from a group for each subcommand that
# names it (fresh each time: a subcommand's own defaults must not leak into another's).
FLAG_GROUPS = {
    "device": [("--device", dict(type=device_name, help="cpu, cuda or cuda:N (default: cuda when present)")),
               ("--amp", dict(ON, help="bf16 autocast (CUDA and CPU)"))],
    "speed": [("--channels-last", dict(ON, help="channels_last memory format")), ("--compile", dict(ON, help="torch.compile"))],
    "run": [("--resume", dict(ON, help="continue the run in --out (a new run if it holds none)")),
            ("--force", dict(ON, help="overwrite a run that --out already holds")),
            ("--log-every", dict(type=nonneg_float, default=30, help="seconds between in-epoch progress lines")),
            ("--workers", dict(type=nonneg_int, default=WORKERS, help="DataLoader workers (ImageNet; default: the usable CPUs, at most 8)"))],
    "data": [("--data-dir", dict(help="CIFAR: torchvision's folder, or train/ and test/ class folders; ImageNet: train/ val/"))],
    "sizes": [("--subset", dict(type=positive_int, help="a fixed class-balanced subset of the training set")),
              ("--test-n", dict(type=positive_int, help="per-epoch test accuracy on a fixed balanced subset of N")),
              ("--epochs", dict(type=nonneg_int)), ("--lr", dict(type=nonneg_float)),
              ("--batch-size", dict(type=number(int, 2), help="global batch size")), ("--seed", dict(type=seed_int))],
    "measure": [("ckpt", {}), ("--n", dict(type=positive_int, help="a fixed class-balanced subset of N test images")),
                ("--batch-size", dict(type=positive_int, default=256)), ("--seed", dict(type=seed_int, default=0)),
                ("--recalibrate", dict(type=positive_int, metavar="N", help="precise BN on N training images (checkpoint unchanged)"))],
    "force": [("--force", dict(ON, help="replace an --out file that robmask did not write"))],
    "png": [("--out", dict(required=True, help="PNG file"))],
    "two": [("ckpt_a", {}), ("ckpt_b", {})],
}

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2, no usage dump) and no abbreviated options (see given_flags)."""
    def __init__(self, *a, **kw): super().__init__(*a, allow_abbrev=False, **kw)
    def error(self, message): raise UserError(f"{self.prog.split()[-1]}: {message} (see --help)")

def make_parser():
    top = Parser(prog="robmask.py", description=__doc__.split("\n")[0])
    top.add_argument("--check", action="store_true", help="parse and validate the arguments, then exit without running")
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser)
    def command(name, groups, help, *flags, parent=sub, **defaults):  # a subcommand: shared groups, its own flags
        parents = []
        for group in groups.split():
            parents.append(Parser(add_help=False))
            for names, kw in FLAG_GROUPS[group]:
                parents[-1].add_argument(*names if isinstance(names, tuple) else (names,), **kw)
        p = parent.add_parser(name, parents=parents, help=help)
        for *names, kw in flags: p.add_argument(*names, **kw)
        p.set_defaults(**defaults)
        return p
    command("train", "data sizes device speed run", "train a model (Algorithm 1)",
            ("--dataset", dict(default="cifar10", choices=("cifar10", "cifar100", "imagenet", "synthetic"))),
            ("--image-size", dict(type=number(int, 16, 4096), default=224, help="ImageNet crop size")),
            ("--arch", dict(type=lambda a: ARCH_ALIASES.get(a.lower(), a.lower()), default=ARCH,
                            help=f"{', '.join(ARCHS)}; with --dataset imagenet, any torchvision model with BatchNorm2d")),
            ("--method", dict(default="robmask", help=", ".join(METHODS))),
            ("--k", dict(type=number(int, 1, MAX_K), help=f"RobMask's number of bases (default {K})")),
            ("--eps-max", dict(type=parse_eps, default=EPS_MAX, help="ε_max (default 8/255)")),
            ("--fix-p", dict(type=unit_float, help="freeze p instead of drawing it per mini-batch")),
            ("--robmask-adv-only", dict(ON, help="Algorithm 1 literally: no clean branch")),
            ("--attack-steps", dict(type=nonneg_int, default=ATTACK_STEPS)),
            ("--attack-bn", dict(choices=("eval", "train"), default="eval", help="BN mode while attacking")),
            ("--bn-stats", dict(choices=BN_STATS, default=DEFAULT_BN_STATS, help="running statistics (default mixed)")),
            ("--warmup", dict(type=nonneg_float, default=0, metavar="EPOCHS", help="lr warm-up (default 0: the paper's)")),
            ("--momentum", dict(type=number(float, 0, 1), default=MOMENTUM)), ("--wd", dict(type=nonneg_float, default=WD)),
            ("--width", dict(type=number(int, 1, MAX_WIDTH), help="base channels of a CIFAR arch (default 64, the paper)")),
            ("--out", dict(help="run directory (default runs/<dataset>-<arch>-<method>)")),
            epochs=EPOCHS, lr=LR, batch_size=BATCH, seed=0)
    command("finetune-bn", "data sizes device speed run", "§3.1: fine-tune only BN of a checkpoint", ("ckpt", {}),
            ("--on", dict(dest="finetune_on", choices=("clean", "adv"), required=True, help="clean images or PGD examples")),
            ("--params", dict(dest="bn_params", choices=tuple(BN_PARTS), default="affine", help="which BN parts may change")),
            ("--freeze-stats", dict(ON, help="BN in eval mode while γ/β train: the running statistics stay bitwise unchanged")),
            ("--eps", dict(dest="eps_max", type=parse_eps, help="PGD ε for --on adv (default: the checkpoint's ε_max)")),
            ("--out", dict(required=True)), epochs=2, lr=LR)  # the rest: the checkpoint's own
    command("eval", "measure data device force", "accuracy under PGD or AutoAttack",
            ("--attack", dict(choices=("none", "pgd", "autoattack"), default="pgd")),
            ("--eps", dict(type=parse_list(parse_eps), default=[EPS_MAX], help="comma list, e.g. 0,4/255,8/255")),
            ("--steps", dict(type=nonneg_int, default=100)),
            ("--mask", dict(type=mask_name, default="clean", help="clean, matched or a fixed p")),
            ("--aa-version", dict(choices=("standard", "custom", "plus", "rand"), default="standard")),
            ("--aa-attacks", dict(type=named("AutoAttack attack", AA_ATTACKS), default="apgd-ce,apgd-t",
                                  help="with --aa-version custom")), ("--out", dict(help="write the rows as JSON here")))
    command("tradeoff", "measure data device force", "§3.2: sweep the mask u=[1-p, p]",
            ("ckpt_b", dict(nargs="?", help="a second k=1 checkpoint that differs only in BN")),
            ("--p", dict(type=parse_list(unit_float), default=[i / 10 for i in range(11)])),
            ("--eps", dict(type=parse_eps, default=EPS_MAX)), ("--steps", dict(type=nonneg_int, default=20)), ("--out", dict(required=True)))
    command("export", "force", "fold a mask into a plain model (k=1 robmask checkpoint or torchvision state_dict)",
            ("ckpt", {}), ("--mask", dict(type=mask_name, default="clean", help="clean or a fixed p")),
            ("--format", dict(choices=("robmask", "torchvision"), default="robmask")), ("--out", dict(required=True)))
    command("bench", "device speed force", "time, FLOPs, MFU and memory of a training step per method",
            ("--arch", dict(type=arch_name, default=ARCH)), ("--width", dict(type=number(int, 1, MAX_WIDTH), default=16)),
            ("--batch-size", dict(type=positive_int, default=BATCH)), ("--steps", dict(type=positive_int, default=10)),
            ("--warmup", dict(type=nonneg_int, default=2)), ("--out", {}))
    kinds = sub.add_parser("plot", help="Figures 1, 3, 4 and trade-off curves (PNG)").add_subparsers(
        dest="kind", required=True, parser_class=Parser)
    command("bn-params", "two png force", "Figure 1", ("--layer", dict(type=positive_int, default=1)), parent=kinds)
    command("feature-maps", "two data png force", "Figure 4", ("--image", dict(type=nonneg_int, default=0)), parent=kinds)
    command("curves", "png force", "Figure 3", ("runs", dict(nargs="+")), parent=kinds)
    command("tradeoff", "png force", "clean vs robust accuracy over p", ("files", dict(nargs="+")), parent=kinds)
    command("cost", "", "FLOPs and GPU-hours per stage of a `run_all.sh --dry-run` output",
            ("commands", dict(help="a file holding run_all.sh --dry-run's output")))
    command("report", "force", "RESULTS.md from a runs folder written by run_all.sh", ("runs", {}),
            ("--out", dict(help="default RUNS/RESULTS.md")))
    return top

def unfed_bases(args):
    """The rows of statistics that no branch moves under --bn-stats split (they would keep μ=0, σ²=1): a drawn p
    reaches every adversarial row (at its anchor), a fixed one some."""
    k = method_k(args.method, args.k)
    drawn = [args.fix_p] if args.fix_p is not None else ([j / (k - 1) for j in range(1, k)] or [1.0])  # (k=1: its one row)
    strengths = [q for s in branch_strengths(args.method, args.robmask_adv_only) for q in (drawn if s == "p" else [s])]
    moved = sum(MaskedBatchNorm2d.stat_weights(mask_for(args.method, s, k), "split", s * args.eps_max > 0) for s in strengths)  # ε_i = 0: clean, row 0
    return [j for j in range(k) if moved[j] == 0]

def validate(args):
    """Checks across flags (argparse made the single ones), run by --check too: later, only what needs files fails."""
    if args.command == "finetune-bn" and args.freeze_stats and args.bn_params == "stats":
        die("--freeze-stats with --params stats would change nothing: drop one of them")
    if args.command == "export" and args.mask == "matched":
        die("export folds one fixed mask: use --mask clean or a number p in [0, 1]")
    if args.command != "train": return
    if args.method not in METHODS: die(f"unknown --method {args.method!r}; choose from {', '.join(METHODS)}")
    if args.k is not None and METHODS[args.method][0] is not None:
        die(f"--k is fixed to {METHODS[args.method][0]} by --method {args.method}; only robmask takes --k")
    if args.dataset == "imagenet" and args.arch not in torchvision_archs():
        die(f"unknown architecture {args.arch!r} for image folders (--dataset imagenet): use a torchvision "
            "classification model with BatchNorm2d, e.g. resnet18, resnet50, efficientnet_b0, mobilenet_v3_large")
    if args.dataset == "imagenet" and args.width is not None:
        die("--width applies to the CIFAR architectures only; torchvision's models come at their own width")
    if args.dataset != "imagenet" and args.arch not in ARCHS:
        die(f"unknown architecture {args.arch!r}; choose from {', '.join(ARCHS)} (or 'resnext'), or use "
            "--dataset imagenet for torchvision's models")
    args.width = args.width or WIDTH
    if args.width < MIN_WIDTH.get(args.arch, 1):
        die(f"--width {args.width} is too small for {args.arch}: it needs at least {MIN_WIDTH[args.arch]}")
    if args.dataset == "synthetic" and args.data_dir:
        die("--data-dir is not used with --dataset synthetic (built-in data); drop it, or pick the dataset it holds")
    if args.warmup > args.epochs:
        die(f"--warmup {args.warmup:g} is longer than --epochs {args.epochs}; warm up for at most the whole run")
    if args.fix_p is not None and "p" not in METHODS[args.method][2]:
        die(f"--fix-p applies to methods that draw p (robmask, advprop-random), not {args.method}")
    if args.bn_stats == "split" and unfed_bases(args):
        die(f"--bn-stats split leaves statistics row(s) {unfed_bases(args)} of --method {args.method} without "
            "data (no branch feeds them: --robmask-adv-only or --fix-p?); use --bn-stats mixed or shared")
    args.out = args.out or os.path.join("runs", f"{args.dataset}-{args.arch}-{args.method}")

def given_flags(parser, argv, command):
    """{dest: flag} of the options typed (--flag or --flag=value; no abbreviations: Parser), not defaulted."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    typed = {t.split("=")[0] for t in argv if t.startswith("--")}
    return {"command": "command", **{a.dest: a.option_strings[0] for a in sub._actions if typed & set(a.option_strings)}}

COMMANDS = {"train": cmd_train, "finetune-bn": cmd_finetune_bn, "eval": cmd_eval, "tradeoff": cmd_tradeoff,
            "export": cmd_export, "bench": cmd_bench, "cost": cmd_cost, "plot": cmd_plot, "report": cmd_report}

class Terminated(KeyboardInterrupt): """SIGTERM (a timeout, a scheduler), handled as Ctrl-C: a run that has not saved cleans up."""
def on_sigterm(signum, frame): raise Terminated()

def main(argv=None):
    parser, code, args = make_parser(), 0, None
    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        args = parser.parse_args(argv)
        validate(args)
        if args.check: print("ok: arguments are valid")
        elif args.command in ("train", "finetune-bn"):
            COMMANDS[args.command](args, given_flags(parser, sys.argv[1:] if argv is None else argv, args.command))
        else: COMMANDS[args.command](args)
    except UserError as e:
        print(f"robmask: error: {e}", file=sys.stderr, flush=True)
        code = 2
    except SystemExit as e: code = e.code  # --help
    except KeyboardInterrupt as e:
        training = args is not None and args.command in ("train", "finetune-bn")
        msg = ("the last checkpoint (end of the last finished epoch) is intact: run the same command with --resume to "
               "continue" if training and os.path.exists(os.path.join(args.out, "checkpoint.pt")) else
               "nothing was saved" + (" (no epoch had finished)" if training else ": run the command again"))
        print(f"robmask: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; {msg}", file=sys.stderr, flush=True)
        code = 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None: signal.signal(signal.SIGTERM, previous)
    if dist.is_initialized():
        dist.destroy_process_group()
        # Leave without tearing down the interpreter: gloo's worker threads can still hold Python
        # tensors then, which sometimes aborts the process (pytorch/pytorch#179291). Files are fsynced.
        for stream in (sys.stdout, sys.stderr): stream.flush()
        os._exit(code)
    return code

if __name__ == "__main__": sys.exit(main())
