"""Learned drafters (mtp1, eagle, dspark): checkpoints and the `Drafter` that serves them.

A checkpoint is a directory: `config.json` (the `HeadConfig`), `model.safetensors` (the head's own weights in
bf16 and its draft vocabulary; the target's embedding and LM head are not in it) and `training_args.json`.

Serving state per sequence (one slot of the head's KV cache):
- the target features the target sent (`observe_target_features`), for positions 0 .. n-1;
- the context stream cached in the slot: position t holds (features at t, token at t + 1), so the last position
  with features, the anchor a, can be cached once the token after it is known; its output predicts token a + 2.
Each `propose` repairs the slot to the longest prefix of the request's context it agrees with (like the `model`
drafter), feeds the new positions for all sequences in one padded forward, drafts, and rolls the draft positions
back out of the cache. Tokens of the context past a + 1 are ones a running-ahead draft worker assumed; they have
no target features yet, so they are fed as if drafted (the head's own outputs stand in for the features, as
DESIGN.md asks), and the proposal continues after them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workers.drafters.base import DraftProposal, DraftRequest, Drafter
from workers.drafters.head import DraftHead, HeadConfig
from workers.drafters.model import _common_prefix
from workers.params import SamplingParams
from workers.verify.sampling import filter_logits_to_probs, sample_from_probs

CHECKPOINTS_DIR = Path(__file__).resolve().parent / "checkpoints"  # shipped drafters: checkpoints/<target>/<kind>
# dspark greedy: the Markov head re-ranks this many candidates of each position's parallel guess. 16 lost the right
# token at position 2 so often that its acceptance there fell below the training-time figure: on 8 held-out chat
# prompts tau 1.57 with 16, 1.66 with 64, 1.68 with 256, 1.69 with the whole draft vocabulary (much slower).
CANDIDATES = 256
# Default predicted-survival bar at which a draft ends (`min_confidence`), per kind; measured on held-out chat
# prompts with `specray eval --min-confidence ...` (README, "Learned drafters").
DEFAULT_MIN_CONFIDENCE = {"mtp1": 0.0, "eagle": 0.3, "dspark": 0.3}
# A token tree keeps at most this many nodes, the ones with the highest predicted path survival: verifying 8 to ~16
# positions costs a CPU target about the same (fixed costs dominate), more than that costs more.
MAX_TREE_NODES = 12
# dspark trees: at each depth the nodes of highest path survival (at most this many, and at or above the survival
# bar, as a chain continues while its survival is) grow children; the rest stay leaves.
TREE_BEAM = 4


# --- checkpoints ---------------------------------------------------------------------------------------------------
def save_head(head: DraftHead, out_dir: str | Path, training_args: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.bfloat16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in head.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "kind": head.cfg.kind})
    tmp.replace(out / "model.safetensors")  # a checkpoint is never half written
    (out / "config.json").write_text(json.dumps(head.cfg.to_dict(), indent=2) + "\n")
    if training_args is not None:
        (out / "training_args.json").write_text(json.dumps(training_args, indent=2, default=str) + "\n")
    return out


def load_head(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> DraftHead:
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"{path} is not a drafter checkpoint (expected config.json and model.safetensors)")
    cfg = HeadConfig(**json.loads((path / "config.json").read_text()))
    head = DraftHead(cfg)
    state = load_file(str(path / "model.safetensors"))
    head.set_draft_vocab(state["draft_vocab"])
    try:
        missing, unexpected = head.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ from what config.json says
        raise ValueError(f"{path}: weights do not match config.json ({str(e).splitlines()[1].strip()})") from None
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config (missing {missing}, unexpected {unexpected})")
    return head.to(device=device, dtype=dtype).eval()


def shipped_checkpoint(kind: str, target_name: str) -> Path | None:
    p = CHECKPOINTS_DIR / target_name / kind
    return p if (p / "config.json").is_file() else None


# --- serving ---------------------------------------------------------------------------------------------------
class _State:
    def __init__(self, slot: int, params: SamplingParams, feature_dim: int, dtype):
        self.slot = slot
        self.params = params
        self.features = torch.empty(64, feature_dim, dtype=dtype)  # [capacity, F] target features by position
        self.num_features = 0  # positions 0 .. n-1 are known
        self.cached_next: list[int] = []  # token at t + 1 for each cached context position t
        self.anchor_out: torch.Tensor | None = None  # [d] context output at the last cached position
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed((params.seed if params.seed is not None else torch.seed()) + 0x5EED)

    def add_features(self, start: int, hidden: torch.Tensor) -> None:
        if start > self.num_features:
            return  # a gap: keep what is contiguous (the next verdict repeats nothing, so drafting just stops)
        end = start + hidden.shape[0]
        if end > self.features.shape[0]:
            grown = torch.empty(max(end, 2 * self.features.shape[0]), self.features.shape[1], dtype=self.features.dtype)
            grown[: self.num_features] = self.features[: self.num_features]
            self.features = grown
        self.features[start:end] = hidden.to(self.features.dtype)
        self.num_features = max(self.num_features, end)


class LearnedDrafter(Drafter):
    def __init__(self, head: DraftHead, max_batch: int = 8, max_model_len: int = 4096, max_draft_tokens: int = 16,
                 min_confidence: float | None = None, tree_width: int = 1):
        self.head = head
        self.cfg = head.cfg
        self.kind = head.cfg.kind
        self.feature_layers = tuple(head.cfg.feature_layers)
        self.max_draft_tokens = 1 if self.kind == "mtp1" else (
            head.cfg.block_size if self.kind == "dspark" else max_draft_tokens)
        # End a draft after the token where its predicted survival (the product of per-token acceptance estimates:
        # dspark's confidence head, eagle's own top probability) falls below this.
        self.min_confidence = DEFAULT_MIN_CONFIDENCE[self.kind] if min_confidence is None else min_confidence
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        # Greedy drafts become token trees, verified in one tree-masked target forward; 1 keeps chains. eagle and
        # mtp1 add each drafted position's runners-up as one-token branches (tree_width candidates per position);
        # dspark gives each of its most promising nodes tree_width children (`_draft_block_tree`). Either way
        # the tree keeps the MAX_TREE_NODES nodes of highest predicted path survival.
        if not 1 <= tree_width <= 8:
            raise ValueError(f"tree_width must be in [1, 8], got {tree_width}")
        self.tree_width = tree_width
        self.cache = head.new_cache(max_batch, max_model_len + self.max_draft_tokens + 2)
        self.states: dict[str, _State] = {}
        self.dtype = head.in_proj.weight.dtype

    def add_sequence(self, seq_id: str, params: SamplingParams) -> None:
        if seq_id in self.states or self.cache.num_free == 0:
            return  # no room: this sequence gets no drafts (the target falls back to k = 0)
        feat_dim = len(self.feature_layers) * self.cfg.hidden_size
        self.states[seq_id] = _State(self.cache.allocate(), params, feat_dim, self.dtype)

    def release(self, seq_id: str) -> None:
        st = self.states.pop(seq_id, None)
        if st is not None:
            self.cache.free(st.slot)

    def observe_target_features(self, seq_id: str, start: int, hidden: torch.Tensor) -> None:
        st = self.states.get(seq_id)
        if st is not None:
            st.add_features(start, hidden)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        out = [DraftProposal() for _ in requests]
        rows, anchors, forced, want = [], [], [], []
        for i, r in enumerate(requests):
            st = self.states.get(r.seq_id)
            if st is None or r.k <= 0 or len(r.token_ids) < 2:
                continue
            a = min(st.num_features, len(r.token_ids) - 1) - 1  # anchor: last position with features
            f = r.token_ids[a + 2:]  # assumed by a draft worker running ahead, not verified yet
            n = min(r.k, self.max_draft_tokens - len(f)) if self.kind != "eagle" else r.k
            if a < 0 or n <= 0 or a + len(f) + n + 2 >= self.cache.capacity:
                continue
            rows.append(i)
            anchors.append(a)
            forced.append(f)
            want.append(n)
        if not rows:
            return out
        states = [self.states[requests[i].seq_id] for i in rows]
        contexts = [requests[i].token_ids for i in rows]
        if self.kind == "dspark":
            total = [len(f) + n for f, n in zip(forced, want)]
            o_all = self._block_outputs(contexts, states, anchors, total)
            if self.tree_width > 1 and all(st.params.greedy for st in states) and not any(forced):
                drafted = self._draft_block_tree(total, o_all)
            else:
                drafted = self._draft_block(states, forced, total, o_all)
        else:
            self._update_context(contexts, states, anchors)
            drafted = self._draft_chain(states, forced, want)
        for j, i in enumerate(rows):
            self.cache.rollback(states[j].slot, anchors[j] + 1)
            out[i] = drafted[j].best_nodes(MAX_TREE_NODES)
        return out

    # --- steps -----------------------------------------------------------------------------------------------------
    def _context_feeds(self, contexts: list[list[int]], states: list[_State], anchors: list[int]):
        """Repair each slot to the longest cached prefix its context agrees with; per row, (keep, tokens) of the
        context positions keep .. anchor still to feed, or None if the anchor's output is already known."""
        feeds = []
        for ctx, st, a in zip(contexts, states, anchors):
            target_next = ctx[1 : a + 2]  # token at t + 1 for t = 0 .. a
            keep = _common_prefix(st.cached_next, target_next, limit=len(target_next))
            if keep == a + 1 == len(st.cached_next) and st.anchor_out is not None:
                feeds.append(None)
                continue
            keep = min(keep, a)  # re-run at least the anchor to get its output
            self.cache.rollback(st.slot, keep)
            st.cached_next = st.cached_next[:keep]
            feeds.append((keep, target_next[keep:]))
        return feeds

    def _context_inputs(self, states: list[_State], feeds) -> tuple[list[int], torch.Tensor | None]:
        """(rows with something to feed, their head inputs [R, T, d] right padded)."""
        todo = [j for j, f in enumerate(feeds) if f is not None]
        if not todo:
            return todo, None
        n = [len(feeds[j][1]) for j in todo]
        T = max(n)
        feats = torch.zeros(len(todo), T, self.states_feature_dim, dtype=self.dtype)
        nxt = torch.zeros(len(todo), T, dtype=torch.long)
        for r, j in enumerate(todo):
            keep, toks = feeds[j]
            feats[r, : n[r]] = states[j].features[keep : keep + n[r]]
            nxt[r, : n[r]] = torch.tensor(toks)
        dev = self.head.in_proj.weight.device
        return todo, self.head.context_inputs(feats.to(dev), nxt.to(dev))

    def _update_context(self, contexts: list[list[int]], states: list[_State], anchors: list[int]) -> None:
        """Make each slot hold context positions 0 .. anchor and remember the anchor's output."""
        feeds = self._context_feeds(contexts, states, anchors)
        todo, x = self._context_inputs(states, feeds)
        if not todo:
            return
        n = [len(feeds[j][1]) for j in todo]
        y = self.head.cached(x, self.cache, [states[j].slot for j in todo], n)  # [R, T, d]
        for r, j in enumerate(todo):
            st = states[j]
            st.cached_next += feeds[j][1]
            st.anchor_out = y[r, n[r] - 1].clone()

    def _block_outputs(self, contexts, states, anchors, total) -> torch.Tensor:
        """dspark: the context update and the block's parallel forward in ONE head pass. Each row feeds its new
        context positions (up to the anchor) followed by the block's mask positions, which sit right after the
        anchor, so causal attention in the slot cache is exactly "context up to the anchor, then the block before
        it". Returns [R, K, d]: the anchor's output, then the K - 1 block positions'."""
        head = self.head
        K = max(total)
        feeds = self._context_feeds(contexts, states, anchors)
        todo, x_ctx = self._context_inputs(states, feeds)
        where = {j: r for r, j in enumerate(todo)}
        n = [len(feeds[j][1]) if feeds[j] is not None else 0 for j in range(len(states))]
        if K == 1 and not todo:
            return torch.stack([st.anchor_out for st in states])[:, None]
        masks = head.mask_embed[: K - 1]
        T = max(n) + K - 1
        x = torch.zeros(len(states), T, masks.shape[-1], dtype=masks.dtype, device=masks.device)
        for j in range(len(states)):
            if n[j]:
                x[j, : n[j]] = x_ctx[where[j], : n[j]]
            x[j, n[j] : n[j] + K - 1] = masks
        y = head.cached(x, self.cache, [st.slot for st in states], [n[j] + K - 1 for j in range(len(states))])
        out = torch.empty(len(states), K, masks.shape[-1], dtype=y.dtype, device=y.device)
        for j, st in enumerate(states):
            if n[j]:
                st.cached_next += feeds[j][1]
                st.anchor_out = y[j, n[j] - 1].clone()
            out[j, 0] = st.anchor_out
            out[j, 1:] = y[j, n[j] : n[j] + K - 1]
        return out

    @property
    def states_feature_dim(self) -> int:
        return len(self.feature_layers) * self.cfg.hidden_size

    def _draft_chain(self, states, forced, want) -> list[DraftProposal]:
        """mtp1 / eagle: one head forward per draft position after the first, over the rows still drafting."""
        head = self.head
        R = len(states)
        outs = [st.anchor_out for st in states]  # current output per row: predicts the next position's token
        tokens: list[list[int]] = [[] for _ in range(R)]
        probs: list[list[torch.Tensor]] = [[] for _ in range(R)]
        conf: list[list[float]] = [[] for _ in range(R)]
        survive = [1.0] * R  # the draft's own estimate that every token so far is accepted
        total = [len(f) + n for f, n in zip(forced, want)]
        alts: list[list[tuple[int, float, int]]] = [[] for _ in range(R)]  # (token, prob, parent): tree_width > 1
        i = 0
        while True:
            # position i of every active row: forced (assumed) or drafted from its current output
            active = [j for j in range(R) if i < total[j]]
            drafted = [j for j in active if i >= len(forced[j])]
            if drafted:
                lg = head.logits(torch.stack([outs[j] for j in drafted]))  # [n, Vd]
                picks = self._pick([states[j] for j in drafted], lg, [probs[j] for j in drafted])
                sm = lg.softmax(-1)
                top = sm.amax(-1).tolist()
                if self.tree_width > 1:  # each position's runners-up, as one-token branches beside the chain
                    p_alt, i_alt = sm.topk(min(self.tree_width, sm.shape[-1]), -1)
                    t_alt, p_alt = head.draft_vocab[i_alt[:, 1:]].tolist(), p_alt[:, 1:].tolist()
                    for r, j in enumerate(drafted):
                        if states[j].params.greedy:  # parent: the chain's token before this position
                            alts[j] += [(t, c, len(tokens[j]) - 1) for t, c in zip(t_alt[r], p_alt[r])]
                for j, t, c in zip(drafted, picks, top):
                    tokens[j].append(t)
                    conf[j].append(c)
                    survive[j] *= c
                    if survive[j] < self.min_confidence:  # EAGLE-2's dynamic draft: stop where the chain is
                        total[j] = i + 1  # unlikely to survive; every head forward past it is mostly wasted
            nxt = [j for j in active if i + 1 < total[j]]
            if not nxt:
                break
            prev = torch.tensor([forced[j][i] if i < len(forced[j]) else tokens[j][-1] for j in nxt])
            x = head.chain_inputs(torch.stack([outs[j] for j in nxt]), prev.to(outs[0].device))[:, None]
            y = head.cached(x, self.cache, [states[j].slot for j in nxt], [1] * len(nxt))[:, 0]
            for r, j in enumerate(nxt):
                outs[j] = y[r]
            i += 1
        out = []
        for j in range(R):
            if alts[j]:
                n = len(tokens[j])
                out.append(DraftProposal(tokens[j] + [t for t, _, _ in alts[j]], None,
                                         conf[j] + [c for _, c, _ in alts[j]],
                                         list(range(-1, n - 1)) + [p for _, _, p in alts[j]]))
            else:
                out.append(DraftProposal(tokens[j], torch.stack(probs[j]) if probs[j] else None, conf[j]))
        return out

    def _draft_block(self, states, forced, total, o_all) -> list[DraftProposal]:
        """dspark: the Markov head position by position over the block's parallel outputs o_all [R, K, d]."""
        head = self.head
        R = len(states)
        K = max(total)
        total = list(total)
        greedy = all(st.params.greedy for st in states)
        tokens: list[list[int]] = [[] for _ in range(R)]
        probs: list[list[torch.Tensor]] = [[] for _ in range(R)]
        conf: list[list[float]] = [[] for _ in range(R)]
        survive = [1.0] * R  # the confidence head's estimate that every token so far is accepted
        prev = [None] * R
        for i in range(K):
            active = [j for j in range(R) if i < total[j]]
            if not active:
                break
            z = o_all[active, i]
            base = head.logits(z)  # [n, Vd] the parallel guess at position i
            if i > 0:
                p = torch.tensor([prev[j] for j in active], device=z.device)
                z = head.markov(z, p)
            c = head.confidence_of(z, base.softmax(-1).amax(-1)).tolist()
            drafted = [r for r, j in enumerate(active) if i >= len(forced[j])]
            picks: list[int] = []
            if drafted:
                if greedy and i > 0:  # re-rank the parallel guess's best candidates with the Markov state
                    cand = base[drafted].topk(min(CANDIDATES, base.shape[-1]), -1).indices  # [n, C]
                    h = head.norm(z[drafted])
                    scores = torch.einsum("nd,ncd->nc", h, head._lm[cand].to(h.dtype))
                    picks = head.draft_vocab[cand.gather(1, scores.argmax(-1, keepdim=True))[:, 0]].tolist()
                elif greedy:
                    picks = head.draft_vocab[base[drafted].argmax(-1)].tolist()
                else:
                    lg = head.logits(z[drafted])
                    picks = self._pick([states[active[r]] for r in drafted], lg, [probs[active[r]] for r in drafted])
            it = iter(picks)
            for r, j in enumerate(active):
                if i < len(forced[j]):
                    prev[j] = forced[j][i]
                    continue
                prev[j] = next(it)
                tokens[j].append(prev[j])
                conf[j].append(c[r])
                survive[j] *= c[r]
                if survive[j] < self.min_confidence:  # the block ends after the token where survival falls
                    total[j] = i + 1  # below the bar: later positions are neither scored nor verified
        return [DraftProposal(tokens[j], torch.stack(probs[j]) if probs[j] else None, conf[j]) for j in range(R)]

    def _draft_block_tree(self, total, o_all) -> list[DraftProposal]:
        """dspark, greedy, tree_width > 1: a token tree over the block's parallel outputs o_all [R, K, d].

        Depth by depth, the best nodes so far (TREE_BEAM per row, path survival >= min_confidence) each get
        tree_width children: the Markov head's best re-ranked candidates given the node's token. A first child's
        acceptance estimate is the confidence head's; a runner-up's is its own re-ranked probability. The
        block pass is shared by every node (its outputs do not depend on drafted tokens), so a node costs only the
        Markov head and its re-ranking; `best_nodes` then keeps the MAX_TREE_NODES most likely to be accepted."""
        head = self.head
        R, w = len(total), self.tree_width
        tokens: list[list[int]] = [[] for _ in range(R)]
        parents: list[list[int]] = [[] for _ in range(R)]
        conf: list[list[float]] = [[] for _ in range(R)]
        score: list[list[float]] = [[] for _ in range(R)]
        frontier: list[list[int]] = [[-1] for _ in range(R)]  # nodes to grow children next; -1: the anchor
        for i in range(max(total)):
            items = [(j, n) for j in range(R) if i < total[j] for n in frontier[j]]
            if not items:
                break
            rows = [j for j, _ in items]
            real = sorted(set(rows))
            of = torch.tensor([real.index(j) for j in rows], device=o_all.device)  # node -> its row in `real`
            base = head.logits(o_all[real, i])  # [n_real, Vd] the parallel guess at position i: one per row
            sm = base.softmax(-1)
            top_prob = sm.amax(-1)[of]
            z = o_all[rows, i]
            if i > 0:
                z = head.markov(z, torch.tensor([tokens[j][n] for j, n in items], device=z.device))
            c = head.confidence_of(z, top_prob).tolist()
            if i == 0:
                p_top, i_top = sm.topk(w, -1)
                picks, p_top = head.draft_vocab[i_top][of], p_top[of]  # [n, w]
            else:  # re-rank the parallel guess's best candidates with each node's Markov state
                cand = base.topk(min(CANDIDATES, base.shape[-1]), -1).indices  # [n_real, C]
                lm = head._lm[cand]  # [n_real, C, d]
                h = head.norm(z)
                q = torch.empty(len(items), cand.shape[1], dtype=h.dtype, device=h.device)
                for u in range(len(real)):  # one matmul per row: its nodes against its candidates
                    at = (of == u).nonzero()[:, 0]
                    q[at] = h[at] @ lm[u].to(h.dtype).T
                q = q.float().softmax(-1)
                p_top, i_top = q.topk(min(w, q.shape[-1]), -1)
                picks = head.draft_vocab[cand[of].gather(1, i_top)]
            picks, p_top = picks.tolist(), p_top.tolist()
            grown: list[list[int]] = [[] for _ in range(R)]
            for r, (j, n) in enumerate(items):
                above = 1.0 if n < 0 else score[j][n]
                for b, tok in enumerate(picks[r]):
                    est = c[r] if b == 0 else p_top[r][b]
                    tokens[j].append(tok)
                    parents[j].append(n)
                    conf[j].append(est)
                    score[j].append(above * est)
                    grown[j].append(len(tokens[j]) - 1)
            for j in range(R):
                best = sorted(grown[j], key=lambda x: -score[j][x])[:TREE_BEAM]
                frontier[j] = [x for x in best if score[j][x] >= self.min_confidence]
        return [DraftProposal(tokens[j], None, conf[j], parents[j]) for j in range(R)]

    def _pick(self, states: list[_State], logits: torch.Tensor, probs_out: list[list[torch.Tensor]]) -> list[int]:
        """logits: [n, Vd] over the draft vocabulary -> one target token id per row. Sampled rows draw from the
        request's filtered distribution and record it over the full vocabulary (zero outside the draft vocabulary:
        rejection sampling stays exact for any draft distribution)."""
        vocab = self.head.draft_vocab
        if all(s.params.greedy for s in states):
            return vocab[logits.argmax(-1)].tolist()
        p = [s.params for s in states]
        probs = filter_logits_to_probs(
            logits.cpu(),
            torch.tensor([x.temperature for x in p], dtype=torch.float32),
            torch.tensor([x.top_k for x in p], dtype=torch.long),
            torch.tensor([x.top_p for x in p], dtype=torch.float32),
        )
        idx = sample_from_probs(probs, [s.generator for s in states])
        full = torch.zeros(len(states), self.cfg.vocab_size)
        full[:, vocab.cpu()] = probs
        for row, s in enumerate(states):
            if not s.params.greedy:
                probs_out[row].append(full[row])
        return vocab.cpu()[idx].tolist()
