"""A checkpoint whose image predictor saturates the official score: every image has more than k tokens with keep
margins above 20 (log_softmax(logits)[..., 0] is exactly 0.0 for all of them in fp32), most of them with the exact
same margin, so the kept set is decided by the ranking rule's tie-break (equal margins -> the lower index first).

Built from the tiny checkpoint by rewriting the predictor's last two Linears (official key names):

* `output_mlp.2` (the hidden layer before the last GELU): unit 0 becomes alpha * (s - q), where s is the original
  unit 0 and q its 93rd percentile over sample images; every other unit gets bias -100, so GELU gives exactly 0.
* `output_mlp.4` (the logits): margin = GELU(unit 0) + 25.

So about 7% of the tokens get distinct margins far above 25, and the tokens with s well below q get GELU exactly
0 and the margin exactly 25.0 on every backend (alpha is large, so almost no token lands in the few units of z
where erf implementations may round 1 + erf differently; `check_structure` verifies that on the images used).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dynllava.model.weights import read_state_dict, write_state_dict

TIED_MARGIN = 25.0
PREFIX = "model.image_score_predictor.output_mlp"


@torch.no_grad()
def _unit0_inputs(model, tokenizer, images: list[torch.Tensor]) -> torch.Tensor:
    """The original unit-0 pre-activations s of output_mlp[2] for every image token of `images`."""
    from tests.conftest import prompt_ids

    grabbed = []
    layer = model.image_score_predictor.output_mlp[2]
    hook = layer.register_forward_hook(lambda mod, inp, out: grabbed.append(out[..., 0].flatten()))
    try:
        ids = prompt_ids(tokenizer, "What is shown here?", True)
        feats = model.encode_images(torch.stack(images))
        model.prefill([ids] * len(images), list(feats), capacity=len(ids) + model.num_image_tokens)
    finally:
        hook.remove()
    return torch.cat(grabbed)


def write_saturated_checkpoint(src: Path, dst: Path, model, tokenizer, images: list[torch.Tensor],
                               alpha_scale: float = 1e6) -> Path:
    s = _unit0_inputs(model, tokenizer, images)
    q, alpha = float(s.quantile(0.93)), alpha_scale / float(s.std())
    shutil.copytree(src, dst)
    state = read_state_dict(dst)
    w2, b2 = state[f"{PREFIX}.2.weight"], state[f"{PREFIX}.2.bias"]
    new_w2, new_b2 = torch.zeros_like(w2), torch.full_like(b2, -100.0)
    new_w2[0], new_b2[0] = alpha * w2[0], alpha * (b2[0] - q)
    w4, b4 = state[f"{PREFIX}.4.weight"], state[f"{PREFIX}.4.bias"]
    new_w4 = torch.zeros_like(w4)
    new_w4[0, 0] = 1.0
    new_b4 = torch.tensor([TIED_MARGIN, 0.0], dtype=b4.dtype)
    state.update({f"{PREFIX}.2.weight": new_w2, f"{PREFIX}.2.bias": new_b2, f"{PREFIX}.4.weight": new_w4,
                  f"{PREFIX}.4.bias": new_b4})
    for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.bin")) + list(dst.glob("*.index.json")):
        f.unlink()
    write_state_dict(state, dst)
    return dst


def check_structure(margins: torch.Tensor, k: int) -> None:
    """What the checkpoint is for, on one image's margins [N]: more than k margins above 20, all saturating the
    official score, an exact tie at TIED_MARGIN straddling the top-k boundary, and nothing just below the tie."""
    logits = torch.stack([margins, torch.zeros_like(margins)], dim=-1)
    official = torch.log_softmax(logits, dim=-1)[:, 0]
    assert int((margins > 20).sum()) > k
    assert int((official == 0.0).sum()) > k, "the official score should saturate for more than k tokens"
    tied = int((margins == TIED_MARGIN).sum())
    above = int((margins > TIED_MARGIN).sum())
    assert above < k < above + tied, (above, tied, k)
    near = (margins < TIED_MARGIN) & (margins > TIED_MARGIN - 1e-3)
    assert not bool(near.any()), "a margin just below the tie: an erf rounding zone"
