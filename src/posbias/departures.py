"""Where posbias still departs from each paper's choice, why, and the switch that restores the paper's choice.

Plain data (stdlib only), shown by the report and listed in docs/runtime.md ("Remaining departures"); a test
keeps the two in step. Defaults that reproduce the released code (FastV / AdaptPrune K=2, AdaptPrune's radius-5
neighbourhood and sigma-12 centre mask, PoRe's pure exponential, PosPrune's 2nd / 20th layers) are not listed.
"""

from __future__ import annotations

__all__ = ["DEPARTURES"]

#: (paper, what differs, why, switch that restores the paper's choice)
DEPARTURES: tuple[tuple[str, str, str, str], ...] = (
    ("PosPrune", "PBC polynomial degree chosen 1-5 by 5-fold cross-validation over samples (1-SE rule)",
     "the paper fits 'a polynomial' without stating its degree", "profile-bias fit --degree N"),
    ("PosPrune", "the PBC bias is fitted on attention over all visual tokens, while at run time ARP has already "
     "removed tokens before the decoder, so the corrected attention is a softmax over fewer keys",
     "one profile serves every method; the paper does not say which attention it fitted",
     "params={'arp': False} (or method posprune-pbc) scores under the fit's conditions"),
    ("PosPrune", "FLOPs (Eq. 8) count every token a layer processes, text included",
     "text tokens cost the same per layer; counting visual tokens only under-states the cost",
     "none: recompute from per_sample n_visual with posbias.evaluate.layer_flops"),
    ("PoRe", "the offset form a*exp(bx)+c replaces the released pure exponential when held-out error over sample "
     "folds favours it by more than one standard error",
     "on some models (demo-llava) a constant floor fits the mean attention better",
     "profile-bias fit --pore-form pure"),
    ("UTP", "the default schedule is the exact optimum of the compact (separable) model, not of the token-level "
     "program (Eqs. 4-5), whose size grows with V*L",
     "the token-level program is not solvable at V=576, L=32 here; it runs as a reference where S*(L-1)*V <= 2048",
     "profile-bias solve --formulation tokens (small V*L)"),
    ("UTP", "no vision-side [CLS] pre-pruning before the decoder", "not implemented; the decoder schedule is the "
     "paper's contribution", "none"),
    ("UTP", "for M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) the position-agnostic rows use the uniform position per axis (t, h, w)",
     "the paper defines it for 1-D RoPE", "none (1-D RoPE models are unaffected)"),
)
