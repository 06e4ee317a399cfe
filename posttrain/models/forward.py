"""Packed forwards of a causal LM (or a value model) over rollouts: the one place the RL commands get
per-token log-probs, logits, hidden states and values of sampled completions.

:func:`collate_shared` packs rollouts into one row, a prompt shared by consecutive rollouts computed
once; :func:`token_forward` runs the model and applies the LM head only at completion positions, fused
with the log-softmax (no [tokens, vocab] logits);
:func:`to_layout` turns the flat per-token results into the completion-aligned ``[N, T]`` layout the
pure losses take.
"""

from __future__ import annotations

import torch

from posttrain.data.batching import collate, pack_shared, to_device
from posttrain.data.chat import Example
from posttrain.errors import TrainingError
from posttrain.logprobs import entropy_from_logits, lm_head_logps, selective_log_softmax
from posttrain.models.attention import model_inputs
from posttrain.models.heads import backbone_and_head
from posttrain.models.loading import eval_mode


def collate_shared(prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
    """Pack rollouts into one row, computing a prompt shared by consecutive rollouts only once.

    Consecutive rollouts with the same prompt (a GRPO group) become one tree: the prompt, then each
    completion, where a completion token attends to the prompt and to its own earlier tokens only
    (``batching.pack_shared``: positions continue from the prompt's length, so every completion sees
    exactly what it would alone). A rollout whose prompt differs from its predecessor's starts a new
    tree. With G completions of C tokens after a P-token prompt, a group costs P + G·(C − 1) tokens
    instead of G·(P + C): the last completion token is only a target, never an input.

    Returns input_ids, position_ids [1, T], attn_layout, and per completion token k (flat, ordered by
    rollout then position): ``pred_row``/``pred_col`` (the position whose logits predict it: the
    prompt's last token for the first completion token), ``tgt_seq`` (rollout index in the given
    list), ``tgt_j`` (position in its completion), ``tgt_ids``; plus n_seqs, n_pad.
    """
    trees: list[tuple[list[int], list[int]]] = []  # (prompt, rollout indices)
    for i, p in enumerate(prompts):
        if trees and prompts[trees[-1][1][-1]] == p:
            trees[-1][1].append(i)
        else:
            trees.append((p, [i]))
    # a completion's last token predicts nothing and no later token attends to it: it is never an input
    packed = pack_shared([p for p, _ in trees], [[completions[i][:-1] for i in members] for _, members in trees])
    n = len(prompts)
    pred_col, tgt_j = [None] * n, [None] * n
    for t, (p, members) in enumerate(trees):
        prompt_end = packed["prompt_start"][t] + len(p) - 1
        for i, c0 in zip(members, packed["branch_start"][t]):
            C = len(completions[i])
            pred_col[i] = torch.cat([torch.tensor([prompt_end]), torch.arange(c0, c0 + C - 1)])
            tgt_j[i] = torch.arange(C)
    cols = torch.cat(pred_col)
    return {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"],
            "attn_layout": packed["attn_layout"], "pred_row": torch.zeros_like(cols), "pred_col": cols,
            "tgt_seq": torch.cat([torch.full((len(completions[i]),), i) for i in range(n)]),
            "tgt_j": torch.cat(tgt_j), "tgt_ids": torch.cat([torch.tensor(completions[i]) for i in range(n)]),
            "n_seqs": torch.tensor(n), "n_pad": torch.tensor(packed["n_pad"])}


_HEAD_SLICE_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def _base_lm(model):
    return model.get_base_model() if hasattr(model, "peft_config") else model


def separable_head(model):
    """(the causal LM, its bias-free output layer) when the LM head can run apart from the model's forward
    (Llama/Qwen2/Qwen3/Mistral), else (the causal LM, None). Not for a model whose forward must run: a
    DDP wrapper (its forward prepares the gradient sync) or an FSDP-sharded one (its root all-gathers the
    embeddings and head); :func:`final_hidden` runs that forward."""
    base = _base_lm(model)
    if _arch(base) not in _HEAD_SLICE_ARCHS or _sharded_root(model):
        return base, None
    head = base.get_output_embeddings()
    return base, head if getattr(head, "bias", None) is None else None


def _fsdp_root(model):
    """The ``fully_shard``-ed root of a model (itself, or the causal LM inside a peft model), else None."""
    from torch.distributed.fsdp import FSDPModule

    return next((m for m in (model, _base_lm(model)) if isinstance(m, FSDPModule)), None)


def _sharded_root(model) -> bool:
    return _fsdp_root(model) is not None


def _arch(model) -> str:
    """The model's class name (``fully_shard`` renames the class ``FSDP<Name>``, a subclass of it)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def final_hidden(model, batch: dict):
    """(final hidden states [B, L, H], the output embedding's weight [V, H]) for the fused LM head, or None
    where the model's full forward must run (other architectures, a head with a bias).

    A one-process model runs its decoder alone. A model whose own forward must run instead runs that forward
    with ``logits_to_keep`` selecting no position, so its head makes [B, 0, V] logits (no gradient reaches
    them):

    - a DDP wrapper (``DistributedDataParallel``): its forward prepares the reducer, which all-reduces each
      gradient once when the parameter's gradient accumulator has run in the backward. The head's weight is
      the module's own parameter; its gradient from the fused head (and, tied, from the embedding) is summed
      by autograd into one accumulation, so it is all-reduced once with the others, after the last
      micro-batch only under ``no_sync``. Every trainable parameter is reached from the forward's outputs
      (the empty logits too depend on the head and the whole decoder), so ``find_unused_parameters`` would
      find none unused;
    - an FSDP-sharded root (``fully_shard``): its hooks all-gather the root's parameters (embeddings, final
      norm, head) before the forward and, after the backward, reduce-scatter their gradients. The head's
      weight is read after that forward: FSDP2 keeps a root's parameters unsharded after forward
      (``fully_shard``'s default), so it is the whole parameter the forward used. Its gradient accumulates
      in that parameter's ``.grad``, which the root's post-backward, queued to run once at the end of the
      backward, reduce-scatters into the sharded gradient. A frozen sharded model has no backward: its
      root is resharded once the head has run (:func:`_reshard_frozen`).

    With grad the hidden states are taken from the wrapper's output (``hidden_states[-1]``, the decoder's
    final hidden states themselves), so the backward passes whatever the wrapper put on its outputs: FSDP's
    pre-backward hook, DDP's sink (with ``find_unused_parameters`` or ``static_graph``). Without grad a
    forward hook on the decoder takes them: returning every layer's hidden states would keep them all alive
    until the forward ends."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = isinstance(model, DistributedDataParallel)
    base = _base_lm(model.module if ddp else model)
    head = base.get_output_embeddings() if _arch(base) in _HEAD_SLICE_ARCHS else None
    if head is None or getattr(head, "bias", None) is not None:
        return None
    if not ddp and not _sharded_root(model):
        return base.get_decoder()(**model_inputs(base, batch)).last_hidden_state, head.weight
    grad, got = torch.is_grad_enabled(), []
    hook = None if grad else base.get_decoder().register_forward_hook(
        lambda _m, _i, out: got.append(out.last_hidden_state))
    nowhere = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
    try:
        out = model(**model_inputs(model, batch), logits_to_keep=nowhere, output_hidden_states=grad)
    finally:
        if hook is not None:
            hook.remove()
    weight = head.weight
    if hasattr(weight, "to_local"):  # a DTensor: the root was resharded after its forward
        raise TrainingError("the sharded model's LM head was resharded after its forward, so the fused head "
                            "cannot use it", where="train.strategy",
                            fix="report this: the root must keep fully_shard's reshard_after_forward default")
    return (out.hidden_states[-1] if grad else got[-1]), weight


def _reshard_frozen(model) -> None:
    """After a forward of a frozen FSDP-sharded model (``train.frozen=shard``: a KL reference, a live DPO/KTO
    reference, a distillation teacher) and the head that used its root's weight: reshard the root
    (``FSDPModule.reshard``). FSDP2 reshards a root only in its post-backward, which a model without trainable
    parameters never has, so its embeddings, final norm and head would otherwise stay whole on every process
    from its first forward on. The next forward all-gathers them again, as it does every decoder layer."""
    root = _fsdp_root(model)
    if root is not None and not any(p.requires_grad for p in model.parameters()):
        root.reshard()


def token_forward(model, batch: dict, temperature: float = 1.0, want_hidden: bool = False,
                  want_entropy: bool = False):
    """One forward of a causal LM over a :func:`collate_shared` batch. Returns a dict of completion-token
    tensors, flat over the batch's K completion tokens: ``logp`` [K] (log π(token), T-tempered), optional
    ``entropy`` [K] (of the T-tempered next-token distribution; differentiable) and ``hidden`` [K, H]
    (last hidden state before each token), plus the index tensors ``seq``/``j`` that place them in a
    ``[n, T]`` layout.

    For Llama/Qwen2/Qwen3/Mistral the LM head runs only on the K completion positions, fused with the
    log-softmax and the entropy chunk by chunk (``logprobs.lm_head_logps``): no [K, vocab] logits or
    their gradient exist, and the prompt's logits are never computed (a DDP wrapper or an FSDP-sharded model
    too: see :func:`final_hidden`). Other architectures run their full forward and index it."""
    rows, cols, seq, j, targets = (batch[k] for k in ("pred_row", "pred_col", "tgt_seq", "tgt_j", "tgt_ids"))
    apart = final_hidden(model, batch)
    res = {"seq": seq, "j": j}
    if apart is not None:
        hidden = apart[0][rows, cols]
        out = lm_head_logps(hidden, apart[1], targets, temperature=temperature, return_entropy=want_entropy)
        res["logp"], res["entropy"] = (out[0].float(), out[1].float()) if want_entropy else (out.float(), None)
    else:
        out = model(**model_inputs(model, batch), output_hidden_states=want_hidden)
        logits = out.logits[rows, cols]
        hidden = out.hidden_states[-1][rows, cols] if want_hidden else None
        res["logp"] = selective_log_softmax(logits, targets, temperature=temperature).float()
        res["entropy"] = entropy_from_logits(logits, temperature=temperature).float() if want_entropy else None
    _reshard_frozen(model)
    if want_hidden:
        res["hidden"] = hidden
    return res


def to_layout(flat: torch.Tensor, seq: torch.Tensor, j: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """Flat per-token values [K] -> completion-aligned [n, T] (zeros elsewhere; differentiable)."""
    out = flat.new_zeros(n, T)
    return out.index_put((seq, j), flat)


def critic_values(critic, batch: dict) -> torch.Tensor:
    """Per-token values [K] from a separate value model (a ``*ForSequenceClassification``): its head
    applied to the hidden state that precedes each completion token."""
    backbone, head = backbone_and_head(critic)
    out = backbone(**model_inputs(critic, batch))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return head(hidden[batch["pred_row"], batch["pred_col"]]).squeeze(-1).float()


def ref_logp_fn(ref_model, policy, temperature: float):
    """micro_batch -> (flat ref log-probs, seq, j): a separate frozen model, or the LoRA policy with its
    adapters disabled (``policy``: the model, or a callable returning the one to use at call time, such
    as an FSDP run's gathered copy)."""
    def fn(mb):
        if ref_model is not None:
            out = token_forward(ref_model, mb, temperature)
        else:
            model = policy() if callable(policy) and not isinstance(policy, torch.nn.Module) else policy
            with model.disable_adapter():
                out = token_forward(model, mb, temperature)
        return out["logp"], out["seq"], out["j"]
    from torch.distributed.fsdp import FSDPModule

    # a sharded model's forward is a collective: see lockstep
    fn.collective_device = next(ref_model.parameters()).device if isinstance(ref_model, FSDPModule) else None
    return fn


def lockstep(fn, n: int) -> None:
    """Before ``n`` rollouts go through ``fn`` in micro-batches: when ``fn`` runs a sharded model (its every
    forward a collective), check that every rank holds as many, and stop all of them at once if not,
    instead of letting the ranks with more wait forever for the others."""
    device = getattr(fn, "collective_device", None)
    if device is None:
        return
    import torch.distributed as dist

    t = torch.tensor([n, -n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise TrainingError(f"the processes hold different numbers of rollouts ({-int(t[1])} to {int(t[0])}), but a "
                            "sharded frozen model (train.frozen=shard) must run the same forwards on each",
                            where="train.frozen", fix="use train.frozen=replicate for this run, and report it")


def policy_logp_fn(policy, temperature: float):
    def fn(mb):
        with eval_mode(policy):
            out = token_forward(policy, mb, temperature)
        return out["logp"], out["seq"], out["j"]
    return fn


@torch.no_grad()
def completion_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                     micro: int = 64) -> torch.Tensor:
    """[N] summed log π(completion | prompt) in packed forwards (no padding compute; the LM head only at
    completion positions, see :func:`sequence_logps`)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompt_ids), micro):
        exs = [Example(p + c, [0] * len(p) + [1] * len(c))
               for p, c in zip(prompt_ids[s:s + micro], completion_ids[s:s + micro])]
        out.append(sequence_logps(model, to_device(collate(exs, packing=True), device))[0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def response_mask(batch: dict) -> torch.Tensor:
    """[R, L-1] float: position t predicts token t+1, a response token of the same sequence."""
    same = batch["seq_index"][:, 1:] == batch["seq_index"][:, :-1]
    return (batch["loss_mask"][:, 1:].bool() & same).float()


def per_sequence_sum(values: torch.Tensor, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """[n_seqs] sums of ``values`` ([R, L-1], shifted like log-probs) over ``mask``, per sequence."""
    n = int(batch["n_seqs"])
    seq = batch["seq_index"][:, 1:]
    keep = mask.bool()
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, seq[keep], values[keep])


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs [n_seqs], response token counts [n_seqs]) from one forward.

    For Llama/Qwen2/Qwen3/Mistral the LM head runs only at the positions that predict a response token,
    fused with the log-softmax chunk by chunk (``logprobs.lm_head_logps``): no [tokens, vocab] logits
    exist for the batch, and prompt positions get no LM head at all. Other architectures run their full
    forward and gather (``token_logps``, never a full log-softmax). A packed batch has no padding compute."""
    n = int(batch["n_seqs"])
    if "src" in batch:  # shared-prompt layout: explicit (predicting position, target token) pairs
        pos, targets, seq = batch["src"], batch["input_ids"].reshape(-1)[batch["tgt"]], batch["tgt_seq"]
    else:
        mask = response_mask(batch).bool()
        rows, cols = mask.nonzero(as_tuple=True)
        L = batch["input_ids"].shape[1]
        pos, targets, seq = rows * L + cols, batch["input_ids"][rows, cols + 1], batch["seq_index"][rows, cols + 1]
    lp = position_logps(model, batch, pos, targets)
    sums = torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, seq, lp)
    return sums, torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, seq, torch.ones_like(lp))


def position_logps(model, batch: dict, pos: torch.Tensor, targets: torch.Tensor, return_hits: bool = False):
    """log π(targets | prefix) at flat row positions ``pos`` of a packed batch ([K] fp32; with
    ``return_hits`` also [K] bool: the target is the arg-max). For Llama/Qwen2/Qwen3/Mistral the LM head
    runs only at ``pos``, fused with the log-softmax chunk by chunk (``logprobs.lm_head_logps``), so no
    [tokens, vocab] logits exist for the batch (under DDP or FSDP too: :func:`final_hidden`); other
    architectures run their full forward and gather."""
    apart = final_hidden(model, batch)
    if apart is not None:
        hidden, weight = apart
        out = lm_head_logps(hidden.reshape(-1, hidden.shape[-1])[pos], weight, targets, return_hits=True)
        lp, hits = out[0].float(), out[1]
    else:
        logits = model(**model_inputs(model, batch)).logits
        logits = logits.reshape(-1, logits.shape[-1])[pos]
        lp = selective_log_softmax(logits, targets).float()
        hits = logits.detach().argmax(-1) == targets
    _reshard_frozen(model)
    return (lp, hits) if return_hits else lp
