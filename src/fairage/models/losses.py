"""Training losses beyond weighted regression: Group DRO, Balanced MSE (BMC), DEX, CORAL, CORN, label uncertainty.

Pure torch (the ordinal losses through ``coral-pytorch``). Shapes: a batch of B faces;
``pred``/``target`` (B,) in the model's *label units* (years / 100 for ``output: sigmoid``,
years for ``linear``); DEX logits (B, 101) over the ages 0..100 and CORAL/CORN logits
(B, 100), one per threshold "age > k" for k = 0..99, with targets in years. Every ``*_per_face`` function returns (B,)
losses so that sample weights, Group DRO and plain means compose the same way.

* ``bmc_loss`` (Ren et al., CVPR 2022, "Balanced MSE", batch-based Monte-Carlo form):
  ``-log softmax_j(-(pred_i - y_j)^2 / (2 sigma^2))`` at ``j = i``, times ``2 sigma^2``
  detached (restores the MSE scale); ``sigma`` is learnable (``BMCLoss``; under
  ``torch.distributed`` the j run over every process's targets).
* ``dex_loss_per_face`` (Rothe et al., 2015, DEX): cross-entropy over 101 age classes,
  against a one-hot class or a Gaussian label distribution; ``dex_expectation`` is the
  prediction, ``sum_k k softmax_k``.
* ``coral_loss_per_face`` (Cao et al. 2020, CORAL) and ``corn_loss_per_face`` (Shi et al.
  2023, CORN): K-1 = 100 binary tasks "age > k" over the ages 0..100; the prediction is the
  number of thresholds passed (``ordinal_ages``), CORAL's from each task's probability,
  CORN's from their running product (the tasks are conditional on the previous ones).
* ``dex_spread`` / ``ordinal_spread``: the standard deviation (years) of the predicted age
  distribution of each face.
* ``GroupDRO`` (Sagawa et al., ICLR 2020): per-group mean losses, online
  exponentiated-gradient group weights ``q``, loss ``sum_g q_g loss_g``; under
  ``torch.distributed`` the group means are over all processes' faces.
* ``draw_targets`` / ``inverse_variance_weights``: use the raters' spread ``age_std``.
* ``StageObjective``: one stage's training/validation loss built from these parts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

#: DEX classes: the ages 0, 1, ..., 100 years
DEX_AGES = 101


def _world_size() -> int:
    """Processes in the ``torch.distributed`` group (DDP); 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# --------------------------------------------------------------------------- regression


def regression_loss_per_face(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", huber_delta: float = 1.0
) -> torch.Tensor:
    """Element-wise mse / mae / huber of (B,) tensors in the same units -> (B,).

    ``huber_delta`` is in those units too.
    """
    pred = pred.reshape(-1)
    target = target.reshape(-1).to(pred.dtype)
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "mae":
        return F.l1_loss(pred, target, reduction="none")
    if kind == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    raise ValueError(f"unknown regression loss {kind!r}; choose mse, mae or huber")


def weighted_loss(pred, target, weight=None, kind: str = "mse", huber_delta: float = 1.0) -> torch.Tensor:
    """Batch loss like Keras ``sample_weight``: ``sum_i w_i * l_i / batch_size``.

    ``pred``, ``target``: tensors of shape (B,) or (B, 1) in the same units (fairage
    passes years/100 for sigmoid heads; ``huber_delta`` must be in those units too).
    ``weight``: (B,) or None (plain mean). Keras's default reduction
    (``sum_over_batch_size``) divides by the batch size, not by the sum of weights, so a
    batch of heavy faces counts more, which is the point of weighting. An unknown ``kind``
    is a ConfigError.
    """
    if kind not in ("mse", "mae", "huber"):
        raise ConfigError(f"unknown loss '{kind}'; choose mse, mae or huber")
    per_face = regression_loss_per_face(pred, target, kind, huber_delta)
    if weight is None:
        return per_face.mean()
    return (per_face * weight.reshape(-1).to(per_face.dtype)).sum() / per_face.numel()


# --------------------------------------------------------------------------- Balanced MSE


def bmc_loss_per_face(
    pred: torch.Tensor,
    target: torch.Tensor,
    noise_var: torch.Tensor | float,
    contrast: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Balanced MSE, batch Monte-Carlo form, one term per face: (B,) pred and target -> (B,).

    ``logits[i, j] = -(pred_i - target_j)^2 / (2 noise_var)``; face i's term is the
    cross-entropy of row i with class i, multiplied by ``2 noise_var`` (detached, so the
    learnable variance gets gradient only through the logits). The batch's other targets
    stand in for the training label distribution, so a face whose label is common in the
    batch is pulled less towards it than under MSE. ``noise_var`` in label units squared.

    ``contrast`` (M,): the targets the faces are contrasted with, instead of ``target``
    itself; face i's own target is ``contrast[offset + i]`` (the whole batch of all
    processes under DDP, see ``BMCLoss``).
    """
    pred = pred.reshape(-1, 1).float()
    target = (target if contrast is None else contrast).reshape(1, -1).to(pred.dtype)
    noise_var = torch.as_tensor(noise_var, dtype=pred.dtype, device=pred.device)
    logits = -(pred - target).pow(2) / (2 * noise_var)
    labels = torch.arange(offset, offset + pred.shape[0], device=pred.device)
    return F.cross_entropy(logits, labels, reduction="none") * (2 * noise_var).detach()


def bmc_loss(pred: torch.Tensor, target: torch.Tensor, noise_var: torch.Tensor | float) -> torch.Tensor:
    """Balanced MSE (BMC) of a batch: the mean of ``bmc_loss_per_face``; a scalar."""
    return bmc_loss_per_face(pred, target, noise_var).mean()


def _all_process_targets(target: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Under ``torch.distributed`` (W > 1 processes): every process's (B_r,) targets concatenated
    in rank order, and where this process's start. Otherwise ``(None, 0)``."""
    world = _world_size()
    if world == 1:
        return None, 0
    target = target.detach().reshape(-1)
    sizes = [torch.zeros(1, dtype=torch.long, device=target.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([target.numel()], dtype=torch.long, device=target.device))
    sizes = [int(n) for n in sizes]
    padded = torch.zeros(max(sizes), dtype=target.dtype, device=target.device)
    padded[: target.numel()] = target
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    rank = dist.get_rank()
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sum(sizes[:rank])


class BMCLoss(nn.Module):
    """BMC with a learnable noise scale ``noise_sigma`` (label units), started at ``init_sigma``.

    Under ``torch.distributed`` (DDP) each face is contrasted with the targets of the whole
    batch, all processes' shares gathered, so the per-face terms are those of one process
    seeing the whole batch.
    """

    def __init__(self, init_sigma: float):
        super().__init__()
        self.noise_sigma = nn.Parameter(torch.tensor(float(init_sigma)))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) pred, (B,) target -> (B,) per-face BMC terms."""
        contrast, offset = _all_process_targets(target)
        return bmc_loss_per_face(pred, target, self.noise_sigma.pow(2), contrast, offset)


# --------------------------------------------------------------------------- DEX


def dex_expectation(logits: torch.Tensor) -> torch.Tensor:
    """DEX prediction: (B, 101) logits -> (B,) expected age in years, ``sum_k k softmax(logits)_k``."""
    probs = torch.softmax(logits.float(), dim=-1)
    ages = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    return probs @ ages


def dex_target_distribution(target_years: torch.Tensor, sigma: float = 0.0, n_classes: int = DEX_AGES) -> torch.Tensor:
    """(B,) ages in years -> (B, n_classes) target distributions over the ages 0..n_classes-1.

    ``sigma == 0``: one-hot at the nearest class (ages clamped to the class range).
    ``sigma > 0`` (years): ``p_k proportional to exp(-(k - age)^2 / (2 sigma^2))``, normalised over the classes.
    """
    t = target_years.reshape(-1, 1).float()
    ages = torch.arange(n_classes, dtype=t.dtype, device=t.device).reshape(1, -1)
    if sigma <= 0:
        index = t.round().clamp(0, n_classes - 1).long().squeeze(1)
        return F.one_hot(index, n_classes).to(t.dtype)
    return torch.softmax(-(ages - t).pow(2) / (2 * sigma**2), dim=1)


def dex_loss_per_face(
    logits: torch.Tensor, target_years: torch.Tensor, sigma: float = 0.0, l1: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of (B, 101) logits against ``dex_target_distribution`` -> (B,) (nats), plus
    ``l1`` times ``|expected age - age|`` in years when ``l1 > 0`` (DLDL-v2, Gao et al. 2018: the
    expectation's error reaches every logit, ``d E / d logit_k = p_k (k - E)``, so the ordering of
    the classes is learnt from each face, not only its own class)."""
    target = dex_target_distribution(target_years, sigma, logits.shape[-1])
    loss = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    if l1 > 0:
        loss = loss + l1 * (dex_expectation(logits) - target_years.reshape(-1).float()).abs()
    return loss


def dex_spread(logits: torch.Tensor) -> torch.Tensor:
    """(B, 101) DEX logits -> (B,) standard deviation in years of the softmax over the ages 0..100."""
    probs = torch.softmax(logits.float(), dim=-1)
    ages = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    mean = probs @ ages
    return (probs @ ages.pow(2) - mean.pow(2)).clamp(min=0).sqrt()


# --------------------------------------------------------------------------- CORAL and CORN

#: ordinal heads' binary tasks: "age > k" for k = 0..99 (DEX_AGES - 1 of them)
ORDINAL_TASKS = DEX_AGES - 1


def age_classes(target_years: torch.Tensor, n_classes: int = DEX_AGES) -> torch.Tensor:
    """(B,) ages in years -> (B,) int64 classes: the nearest whole age, clamped to 0..n_classes-1."""
    return target_years.reshape(-1).round().clamp(0, n_classes - 1).long()


def ordinal_levels(target_years: torch.Tensor, n_classes: int = DEX_AGES) -> torch.Tensor:
    """(B,) ages -> (B, n_classes - 1) float levels, ``levels[i, k] = 1`` when class_i > k
    (``coral_pytorch.dataset.levels_from_labelbatch``, vectorised)."""
    classes = age_classes(target_years, n_classes).reshape(-1, 1)
    ks = torch.arange(n_classes - 1, device=classes.device).reshape(1, -1)
    return (classes > ks).float()


def coral_loss_per_face(logits: torch.Tensor, target_years: torch.Tensor) -> torch.Tensor:
    """CORAL loss of (B, K-1) logits against ages in years -> (B,): the sum over the K-1 tasks
    of the binary cross-entropy of "age > k" (nats; ``coral_pytorch.losses.coral_loss`` per face)."""
    from coral_pytorch.losses import coral_loss

    logits = logits.float()
    return coral_loss(logits, ordinal_levels(target_years, logits.shape[-1] + 1), reduction=None)


def corn_loss_per_face(logits: torch.Tensor, target_years: torch.Tensor) -> torch.Tensor:
    """CORN loss of (B, K-1) logits against ages in years -> (B,).

    Task k is trained only on the faces with class > k-1 (the conditional training sets of
    CORN); face i takes part in ``n_i = min(class_i + 1, K-1)`` tasks. ``coral_pytorch``'s
    ``corn_loss`` is the sum of all these binary cross-entropies divided by ``sum_i n_i``;
    face i's term here is its own sum times ``B / sum_i n_i``, so that the plain mean of the
    (B,) terms is exactly ``corn_loss`` and weights multiply each face's share.
    """
    logits = logits.float()
    classes = age_classes(target_years, logits.shape[-1] + 1).reshape(-1, 1)
    ks = torch.arange(logits.shape[-1], device=logits.device).reshape(1, -1)
    in_task = (classes > ks - 1).float()  # face i is in task k's training set
    label = (classes > ks).float()
    bce = -(F.logsigmoid(logits) * label + (F.logsigmoid(logits) - logits) * (1 - label))
    per_face = (bce * in_task).sum(dim=1)
    return per_face * (len(per_face) / in_task.sum().clamp(min=1))


def ordinal_exceed_probs(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, K-1) logits -> (B, K-1) P(age > k): CORAL's sigmoids (made non-increasing with a running
    minimum, which the trained model satisfies by its shared weights), CORN's running product."""
    if kind == "corn":  # the running product as exp of a running sum: ONNX has CumSum, not CumProd
        return torch.exp(torch.cumsum(F.logsigmoid(logits.float()), dim=-1))
    if kind == "coral":
        return torch.cummin(torch.sigmoid(logits.float()), dim=-1).values
    raise ValueError(f"unknown ordinal head {kind!r}; choose coral or corn")


def ordinal_ages(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, K-1) CORAL/CORN logits -> (B,) predicted age in years: the thresholds passed, ``#{k: P(age > k) > 0.5}``
    (``coral_pytorch.dataset.proba_to_label`` / ``corn_label_from_logits``)."""
    if kind == "coral":
        passed = logits.float() > 0  # sigmoid > 1/2
    elif kind == "corn":  # log of the running product of the sigmoids > log 1/2 (exportable to ONNX)
        passed = torch.cumsum(F.logsigmoid(logits.float()), dim=-1) > math.log(0.5)
    else:
        raise ValueError(f"unknown ordinal head {kind!r}; choose coral or corn")
    return passed.sum(dim=-1).to(torch.float32)


def ordinal_spread(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, K-1) logits -> (B,) standard deviation in years of the age distribution the thresholds give:
    ``P(age = k) = P(age > k-1) - P(age > k)`` over the ages 0..K-1 (``P(age > -1) = 1``, ``P(age > K-1) = 0``)."""
    exceed = ordinal_exceed_probs(logits, kind)
    ones = torch.ones_like(exceed[:, :1])
    upper = torch.cat([ones, exceed], dim=1)
    lower = torch.cat([exceed, torch.zeros_like(ones)], dim=1)
    probs = (upper - lower).clamp(min=0)
    ages = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    mean = probs @ ages
    return (probs @ ages.pow(2) - mean.pow(2)).clamp(min=0).sqrt()


# --------------------------------------------------------------------------- Group DRO


class GroupDRO(nn.Module):
    """Online Group DRO weights over G groups (Sagawa et al. 2020, their ``LossComputer``).

    Parameters
    ----------
    group_sizes : (G,) training faces per group (all > 0).
    eta : step size of the exponentiated-gradient update.
    size_adjustment : C of the group adjustment ``C / sqrt(n_g)`` added to each group's
        loss in the update (0 = none).

    ``q`` (G,) starts uniform and is a buffer, so it is saved in checkpoints.
    """

    def __init__(self, group_sizes, eta: float = 0.01, size_adjustment: float = 0.0):
        super().__init__()
        sizes = torch.as_tensor(group_sizes, dtype=torch.float32).reshape(-1)
        if sizes.numel() == 0 or bool((sizes <= 0).any()):
            raise ValueError("GroupDRO needs at least one group and every group size > 0")
        self.eta = float(eta)
        self.register_buffer("adjustment", float(size_adjustment) / sizes.sqrt(), persistent=False)
        self.register_buffer("q", torch.full_like(sizes, 1.0 / sizes.numel()))

    @property
    def n_groups(self) -> int:
        return int(self.q.numel())

    def group_sums(self, per_face: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) losses and (B,) int group ids -> ((G,) summed loss per group, (G,) faces per group).

        A group absent from the batch has sum 0 and count 0.
        """
        per_face = per_face.reshape(-1).float()
        groups = groups.reshape(-1).long()
        sums = torch.zeros(self.n_groups, dtype=per_face.dtype, device=per_face.device).index_add(0, groups, per_face)
        counts = torch.bincount(groups, minlength=self.n_groups).to(per_face.dtype)
        return sums, counts

    def forward(self, per_face: torch.Tensor, groups: torch.Tensor, update: bool = True) -> torch.Tensor:
        """The robust loss ``sum_g q_g loss_g`` (scalar); with ``update``, q is updated first:
        ``q_g <- q_g exp(eta (loss_g + C / sqrt(n_g)))``, then ``q <- q / sum q``.

        In a ``torch.distributed`` group of W processes (DDP), ``loss_g`` is the mean over
        every process's faces of group g: the per-group sums and counts are all-reduced, so
        all processes update q alike, and each returns ``W sum_g q_g local_sum_g / n_g``,
        whose gradient, averaged over the processes by DDP, is that of one process seeing
        the whole batch.
        """
        sums, counts = self.group_sums(per_face, groups)
        world = _world_size()
        total_sums, total_counts = sums.detach(), counts
        if world > 1:
            totals = torch.cat([total_sums, total_counts])
            dist.all_reduce(totals)
            total_sums, total_counts = totals[: self.n_groups], totals[self.n_groups :]
        total_counts = total_counts.clamp(min=1)
        if update:
            with torch.no_grad():
                # in log space: exp(eta loss_g) overflows float32 for losses of ~90 nats (CORAL
                # and CORN sum 100 binary cross-entropies per face)
                step = self.eta * (total_sums / total_counts + self.adjustment)
                self.q.copy_(torch.softmax(self.q.clamp(min=1e-30).log() + step, dim=0))
        return world * (self.q * sums / total_counts).sum()


# --------------------------------------------------------------------------- label uncertainty


def draw_targets(ages: torch.Tensor, std: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """One epoch's training targets, years (N,): ``age + std * z``, ``z ~ N(0, 1)``, clamped at 0.

    ``ages``, ``std``: (N,) years. The draw depends only on ``(seed, epoch)``, so a
    resumed run draws the same targets as an uninterrupted one.
    """
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    z = torch.randn(ages.shape, generator=generator, dtype=torch.float32)
    return (ages.float().cpu() + std.float().cpu() * z).clamp(min=0.0)


def inverse_variance_weights(std: torch.Tensor, floor: float = 1.0) -> torch.Tensor:
    """(N,) std in years -> (N,) weights ``1 / max(std, floor)^2`` rescaled to mean 1."""
    w = 1.0 / std.float().clamp(min=floor).pow(2)
    return w / w.mean()


# --------------------------------------------------------------------------- one stage's objective


class StageObjective(nn.Module):
    """The loss of one training stage when any method above is on.

    Parameters
    ----------
    kind : the stage's loss: mse, mae, huber, bmc, ce (DEX logits), coral or corn (ordinal logits).
    label_scale : years per label unit (``fairage.models.heads.LABEL_SCALE``).
    huber_delta, bmc_sigma, dex_sigma : in years (converted to label units here).
    dex_l1 : loss ce: weight of the expected age's L1 error (years) added to the cross-entropy.
    dro : a ``GroupDRO`` or None; needs ``face_groups``.
    face_groups : (N,) int group id of every training face (DRO), or None.
    face_ages, face_std : (N,) years of every training face, for ``label_std``.
    label_std : "off", "sample" (targets drawn each epoch) or "weight" (1/std^2 weights).
    age_std_floor : std floor in years; seed : of the target draws.

    ``forward(out, age, weight, index, train)``: ``out`` the model output, ``age`` (B,)
    years, ``weight`` (B,) sample weights or None, ``index`` (B,) positions of the faces in
    the training arrays (None in validation). Training: per-face losses times weights, then
    Group DRO or the mean. Validation: the unweighted mean (MSE for bmc, which depends on the
    batch; with ``label_std`` the recorded ages are the targets).
    """

    # size: the objective's settings, one per config key
    def __init__(
        self,
        kind: str,
        label_scale: float = 1.0,
        huber_delta: float = 5.0,
        bmc_sigma: float = 8.0,
        dex_sigma: float = 0.0,
        dex_l1: float = 0.0,
        dro: GroupDRO | None = None,
        face_groups: torch.Tensor | None = None,
        face_ages: torch.Tensor | None = None,
        face_std: torch.Tensor | None = None,
        label_std: str = "off",
        age_std_floor: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        if dro is not None and face_groups is None:
            raise ValueError("Group DRO needs the group id of every training face")
        if label_std not in ("off", "sample", "weight"):
            raise ValueError(f"label_std must be off, sample or weight, got {label_std!r}")
        if label_std != "off" and (face_ages is None or face_std is None):
            raise ValueError(f"label_std {label_std!r} needs the age and age_std of every training face")
        self.kind = kind
        self.scale = float(label_scale)
        self.huber_delta = huber_delta / self.scale
        self.dex_sigma = float(dex_sigma)
        self.dex_l1 = float(dex_l1)
        self.bmc = BMCLoss(bmc_sigma / self.scale) if kind == "bmc" else None
        self.dro = dro
        self.label_std = label_std
        self.seed = int(seed)
        self.register_buffer("face_groups", None if face_groups is None else face_groups.long(), persistent=False)
        self.register_buffer("face_ages", None if face_ages is None else face_ages.float(), persistent=False)
        std = None if face_std is None else face_std.float().clamp(min=age_std_floor)
        self.register_buffer("face_std", std, persistent=False)
        self.register_buffer(
            "face_weight",
            inverse_variance_weights(std, age_std_floor) if label_std == "weight" else None,
            persistent=False,
        )
        self.register_buffer("epoch_targets", None, persistent=False)

    @property
    def needs_index(self) -> bool:
        """Whether training batches must carry the faces' positions (``index``)."""
        return self.dro is not None or self.label_std != "off"

    def start_epoch(self, epoch: int) -> None:
        """Draw this epoch's targets (``label_std: sample``); ``epoch`` 0-based."""
        if self.label_std == "sample":
            self.epoch_targets = draw_targets(self.face_ages, self.face_std, self.seed, epoch).to(self.face_ages.device)

    def per_face(self, out: torch.Tensor, target_years: torch.Tensor, train: bool) -> torch.Tensor:
        """(B,) losses of the outputs against targets in years."""
        if self.kind == "ce":
            return dex_loss_per_face(out, target_years, self.dex_sigma, self.dex_l1)
        if self.kind == "coral":
            return coral_loss_per_face(out, target_years)
        if self.kind == "corn":
            return corn_loss_per_face(out, target_years)
        target = target_years / self.scale
        if self.kind == "bmc":
            return self.bmc(out, target) if train else regression_loss_per_face(out, target, "mse")
        return regression_loss_per_face(out, target, self.kind, self.huber_delta)

    def forward(
        self,
        out: torch.Tensor,
        age: torch.Tensor,
        weight: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        train: bool = True,
    ) -> torch.Tensor:
        if not train:
            return self.per_face(out, age, train=False).mean()
        if self.needs_index and index is None:
            raise ValueError("training batches must carry the faces' index for Group DRO / label_std")
        target = age
        if self.label_std == "sample":
            if self.epoch_targets is None:
                raise RuntimeError("start_epoch() was not called before training")
            target = self.epoch_targets[index]
        losses = self.per_face(out, target, train=True)
        if weight is not None:
            losses = losses * weight.reshape(-1).to(losses.dtype)
        if self.label_std == "weight":
            losses = losses * self.face_weight[index]
        if self.dro is not None:
            return self.dro(losses, self.face_groups[index])
        return losses.mean()
