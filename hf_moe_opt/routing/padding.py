"""Which tokens are padding, from whatever attention mask the layer receives.

NLLB-MoE removes padding tokens from routing. transformers hands the sparse MLP the attention mask
in the form the attention implementation uses: ``None``, a 2-D keep mask (1 = token), a 4-D boolean
keep mask, or a 4-D additive float mask (0 = attend, very negative = masked). The tokens being routed
are ``seq_len`` consecutive key positions (with a KV cache the keys also hold the past). We read the
last query row, which attends to every non-padding key in both causal and bidirectional masks.

Where the routed tokens sit among the keys: with no cache or a dynamic one they are the last
``seq_len`` keys; a static cache has as many keys as its capacity, the slots after the current
tokens masked. When there are more keys than tokens, the last query is a real (not padding) decoder
token that attends to itself last in a causal mask, so the tokens end at its last attended key.
This is found on the device, per sequence, without a host read.
"""

from __future__ import annotations

import torch


def token_padding_mask(mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """``[batch * seq_len]`` bool, True for padding tokens; ``None`` when nothing is padding."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2:
        keep = mask.bool() if mask.dtype in (torch.bool, torch.int32, torch.int64, torch.uint8) else mask != 0
    elif mask.dim() == 4:
        row = mask[:, 0, -1, :]
        if row.dtype == torch.bool:
            keep = row
        else:
            keep = row > torch.finfo(row.dtype).min / 2 if row.is_floating_point() else row != 0
    else:
        raise ValueError(f"cannot read padding from an attention mask of shape {tuple(mask.shape)}")
    if keep.shape[0] != batch or keep.shape[1] < seq_len:
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} does not cover {batch} sequences of {seq_len} tokens"
        )
    num_keys = keep.shape[1]
    if num_keys == seq_len or mask.dim() == 2:
        return ~keep[:, -seq_len:].reshape(-1)
    keys = torch.arange(num_keys, device=keep.device)
    end = torch.where(keep, keys, -1).amax(dim=1, keepdim=True) + 1  # one past the last attended key
    start = (end - seq_len).clamp(min=0)
    tokens = (start + torch.arange(seq_len, device=keep.device)).clamp(max=num_keys - 1)
    return ~keep.gather(1, tokens).reshape(-1)
