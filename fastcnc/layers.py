"""Masked (pruned) layers: the mask is a buffer and is applied inside the forward, so pruned weights compute as zero.

``MaskedLinear`` / ``MaskedConv2d`` compute with ``weight * mask``. On CPU that is plain ``F.linear`` / ``F.conv2d``
on the masked weight; on CUDA (or a forced ``"triton"`` backend) the layer follows ``fastcnc.masked``'s dispatch
rule: the block-sparse Triton kernels (through ``fastcnc.masked``) when the mask has enough all-zero tiles, else
cuBLAS on ``weight * mask``, or on ``weight`` itself when the mask keeps every weight (the rule is documented in
``fastcnc/masked.py``). Either way the gradient of a pruned weight is exactly 0.

``sparsify(model)`` swaps ``nn.Linear`` / ``nn.Conv2d`` for the masked layers in place (taking over the masks of
``torch.nn.utils.prune``), ``densify(model)`` swaps them back with ``weight = weight * mask`` for export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcnc import masked as _masked
from fastcnc._backend import on_cuda, use_triton
from fastcnc._checks import check_mask


class _MaskedMixin:
    """Shared mask handling for MaskedLinear and MaskedConv2d."""

    mask: torch.Tensor
    weight: nn.Parameter

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight))

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (same shape, dtype bool/int/float, device as the weight; binary) and zero pruned weights.

        On the Triton path the per-tile nonzero table of the new mask is built here, so the forward does not pay for it.
        """
        check_mask(mask, self.weight)
        with torch.no_grad():
            self.mask.copy_(mask)
            self._zero_pruned()
        if use_triton(self.weight):
            self.tile_table()

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        # a fill, not weight * mask: a NaN/Inf at a pruned position times 0 is NaN, and the two backends would then
        # disagree (the kernels skip pruned weights, W * M does not)
        self.weight.masked_fill_(self.mask == 0, 0.0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a loaded mask gets set_mask's checks (binary) and effect (pruned weights zeroed): a state dict is input
        # like any other, and a mask of 0.5 would silently scale the layer
        mask = state_dict.get(prefix + "mask")
        if isinstance(mask, torch.Tensor) and not mask.is_complex() and mask.dtype != torch.bool and mask.numel() \
                and not bool(((mask == 0) | (mask == 1)).all()):
            error_msgs.append(f"{prefix}mask: a pruning mask must be binary (only 0 and 1 entries)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if error_msgs or not isinstance(state_dict.get(prefix + "weight"), torch.Tensor):
            return
        # a loaded weight is zeroed where the mask (loaded, or the layer's own when the state dict has none, as a
        # plain layer's under strict=False) prunes it; with assign=True the parameter holds the caller's tensor, which
        # must not be written: the zeroed weight is then a new tensor
        if local_metadata.get("assign_to_params_buffers", False):
            self.weight.data = self.weight.data.masked_fill(self.mask == 0, 0.0)
        else:
            self._zero_pruned()

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with, ``weight * mask`` (differentiable in ``weight``)."""
        return self.weight * self.mask

    def _dense_route(self, x: torch.Tensor) -> tuple[bool, _masked.TileTable | None]:
        """Whether this call computes densely (``fastcnc.masked``'s dispatch rule: CPU tensors; on CUDA unless
        ``CUDA_KERNELS`` is set and at most ``DENSE_FALLBACK_TILE_DENSITY`` of the tiles are nonzero), and the tile
        table where the Triton backend is in use. The dense route is taken here, not through the functional: its
        checks are for arbitrary arguments, while this weight, mask and bias are the layer's own (x is checked by the
        torch op), and a few microseconds of Python per layer are the whole cost of a small layer's step on a GPU."""
        if not use_triton(x):
            return True, None
        tiles = self.tile_table()
        return on_cuda(x) and not _masked.cuda_takes_kernels(tiles), tiles

    def _dense_weight(self, tiles: _masked.TileTable | None) -> torch.Tensor:
        # a table built from the current mask (its cache key holds the mask's version) that keeps every weight:
        # W * M = W exactly, so no product and no backward multiply (at 0% sparsity the layer runs the dense ops)
        return self.weight if tiles is not None and tiles.full else self.weight * self.mask

    @property
    def sparsity(self) -> float:
        from fastcnc.pruning import tensor_sparsity  # pruning imports this module

        return tensor_sparsity(self.mask)

    def _groups(self) -> int:
        return getattr(self, "groups", 1)

    def tile_table(self) -> _masked.TileTable:
        """Per-tile nonzero table of the mask for the block-sparse kernels, cached until the mask changes.

        The cache key includes the buffer's version counter, so in-place edits (``set_mask``, ``load_state_dict``,
        ``mask.zero_()``) and ``.to(device)`` all invalidate it.
        """
        m = self.mask
        try:
            version = m._version
        except RuntimeError:  # inference tensors have no version counter: never trust a cached table for them
            version = object()
        key = (id(m), m.data_ptr(), version, m.device, m.dtype)
        cache = self.__dict__.get("_tile_cache")
        if cache is None or cache[0] != key:
            g = self._groups()
            cache = (key, _masked.build_tile_table(m.reshape(g, m.shape[0] // g, -1)))
            self.__dict__["_tile_cache"] = cache
        return cache[1]


class MaskedLinear(_MaskedMixin, nn.Linear):
    """``nn.Linear`` with a binary ``mask`` buffer: ``y = x (W * M)^T + b``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense, tiles = self._dense_route(x)
        if dense:
            return F.linear(x, self._dense_weight(tiles), self.bias)
        return _masked.masked_linear(x, self.weight, self.mask, self.bias, tiles=tiles, trusted_mask=True)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> MaskedLinear:
        """A MaskedLinear that shares ``linear``'s weight/bias Parameters (so optimizers stay valid)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.mask = torch.ones_like(linear.weight, requires_grad=False)
        new.train(linear.training)
        if mask is not None:
            new.set_mask(mask)
        return new

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``weight = weight * mask`` (fresh Parameters)."""
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = nn.Parameter(self.effective_weight().detach().clone(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        lin.train(self.training)
        return lin


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """``nn.Conv2d`` with a binary ``mask`` buffer on its weight (all of stride/padding/dilation/groups/bias).

    The Triton path is im2col (``F.unfold``) + the block-sparse masked matmul; it covers ``padding_mode="zeros"``
    with numeric padding. String padding (``"same"``) and other padding modes use ``F.conv2d`` on ``weight * mask``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense, tiles = self._dense_route(x)
        if dense or self.padding_mode != "zeros" or isinstance(self.padding, str):
            # (nn.Conv2d's own path pads first for reflect/replicate/circular and resolves "same" / "valid")
            return self._conv_forward(x, self._dense_weight(tiles), self.bias)
        return _masked.masked_conv2d(x, self.weight, self.mask, self.bias, self.stride, self.padding, self.dilation,
                                     self.groups, tiles=tiles, trusted_mask=True)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None) -> MaskedConv2d:
        """A MaskedConv2d that shares ``conv``'s weight/bias Parameters (so optimizers stay valid)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        with torch.device("meta"):
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                      padding_mode=conv.padding_mode)
        new.weight = conv.weight
        new.bias = conv.bias
        new.mask = torch.ones_like(conv.weight, requires_grad=False)
        new.train(conv.training)
        if mask is not None:
            new.set_mask(mask)
        return new

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with ``weight = weight * mask`` (fresh Parameters)."""
        with torch.device("meta"):
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, groups=self.groups,
                             bias=self.bias is not None, padding_mode=self.padding_mode)
        conv.weight = nn.Parameter(self.effective_weight().detach().clone(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        conv.train(self.training)
        return conv


MASKED_LAYERS = (MaskedLinear, MaskedConv2d)


def _take_over_torch_prune(module: nn.Module) -> torch.Tensor | None:
    """Remove ``torch.nn.utils.prune`` reparametrisations and return the weight mask (None if not pruned)."""
    from torch.nn.utils import prune

    mask = None
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        mask = module.weight_mask.detach().clone()
        prune.remove(module, "weight")  # weight := weight_orig * weight_mask, a plain Parameter again
    if hasattr(module, "bias_orig") and hasattr(module, "bias_mask"):
        prune.remove(module, "bias")  # a bias mask is baked into the bias; MaskedLinear/Conv2d mask weights only
    return mask


def _replaced(old: nn.Module, new: nn.Module) -> nn.Module:
    # the old module remembers its replacement, so that a TSCNC built before sparsify/densify follows the model
    # instead of regularising a module the model no longer computes with (a plain attribute: not a submodule)
    object.__setattr__(old, REPLACED_BY, new)
    return new


REPLACED_BY = "_fastcnc_replaced_by"


def replacement(module: nn.Module) -> nn.Module:
    """The module that ``sparsify`` / ``densify`` put in ``module``'s place (following repeated replacements), or
    ``module`` itself."""
    while REPLACED_BY in module.__dict__:
        module = module.__dict__[REPLACED_BY]
    return module


def _check_convertible(module: nn.Module, name: str) -> None:
    # a replacement would silently drop what hangs on the old module: hooks (torch.nn.utils.prune's own pre-hook is
    # taken over as the mask), parametrizations (weight_norm, spectral_norm: computed weights the mask cannot follow)
    from torch.nn.utils import parametrize, prune

    pre = [h for h in module._forward_pre_hooks.values() if not isinstance(h, prune.BasePruningMethod)]
    hooks = pre + list(module._forward_hooks.values()) + list(module._backward_hooks.values()) + list(
        getattr(module, "_backward_pre_hooks", {}).values())
    if parametrize.is_parametrized(module) or hooks:
        what = "parametrizations (e.g. weight_norm)" if parametrize.is_parametrized(module) else \
            "hooks (e.g. the old torch.nn.utils.weight_norm / spectral_norm, or forward hooks)"
        raise ValueError(f"sparsify: module {name or type(module).__name__!r} has {what} that a masked layer would "
                         "drop; remove them first")


def _convert(module: nn.Module) -> nn.Module | None:
    # exact types only: subclasses such as MultiheadAttention's out_proj are used through their raw weight by their
    # parent, so a mask there would be silently ignored
    if type(module) is nn.Linear:
        return _replaced(module, MaskedLinear.from_dense(module, _take_over_torch_prune(module)))
    if type(module) is nn.Conv2d:
        return _replaced(module, MaskedConv2d.from_dense(module, _take_over_torch_prune(module)))
    return None


def sparsify(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` (exact types) in ``model`` by MaskedLinear / MaskedConv2d, in place.

    Weights and biases are the same Parameter objects. Modules pruned with ``torch.nn.utils.prune`` (``weight_orig``
    + ``weight_mask``) keep their mask as the layer's ``mask``. A module used in several places becomes one masked
    layer in all of them. A module with hooks or parametrizations (``weight_norm``, ``spectral_norm``) raises
    ValueError: its replacement would drop them. Returns ``model`` (or the new layer when ``model`` itself is a
    Linear/Conv2d).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from torch.nn.utils import parametrize

    for name, m in model.named_modules():  # every module checked before any is changed
        # (a parametrized Linear is a subclass, so the exact-type rule would skip it silently: refused instead)
        if type(m) in (nn.Linear, nn.Conv2d) or (isinstance(m, (nn.Linear, nn.Conv2d))
                                                 and parametrize.is_parametrized(m)):
            _check_convertible(m, name)
    root = _convert(model)
    if root is not None:
        return root
    _replace_children(model, _convert)
    return model


def _replace_children(model: nn.Module, convert) -> None:
    """Every slot holding a module that ``convert`` replaces, including each slot of a module used more than once
    (``modules()`` and ``named_children()`` skip repeats): one replacement per module, put in all of its slots."""
    slots = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
             if child is not None]
    new: dict = {}
    for _, _, child in slots:
        if id(child) not in new:
            new[id(child)] = convert(child)
    for parent, name, child in slots:
        if new[id(child)] is not None:
            setattr(parent, name, new[id(child)])


def densify(model: nn.Module) -> nn.Module:
    """Replace every MaskedLinear / MaskedConv2d by plain ``nn.Linear`` / ``nn.Conv2d`` with ``weight*mask``, in place.

    For export (ONNX, TorchScript, other libraries). Returns ``model`` (or the new layer when ``model`` is masked).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, MASKED_LAYERS):
        return _replaced(model, model.to_dense())
    _replace_children(model, lambda child: _replaced(child, child.to_dense()) if isinstance(child, MASKED_LAYERS)
                      else None)
    return model
