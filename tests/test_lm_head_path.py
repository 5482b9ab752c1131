"""The chunked LM-head path gives the logits path's log-probs and gradients, without the logits."""

import torch

import common


def test_lm_head_logprobs_gradcheck_and_values(monkeypatch):
    monkeypatch.setattr(common, "LM_HEAD_CHUNK_ELEMENTS", 30)  # the 16-row minimum: 3 chunks of 40 rows
    torch.manual_seed(0)
    h = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (40,))
    assert torch.autograd.gradcheck(lambda a, b: common.lm_head_logprobs(a, b, y, 0.7), (h, w))
    naive = torch.log_softmax((h @ w.T) / 0.7, -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(common.lm_head_logprobs(h, w, y, 0.7), naive, rtol=0, atol=1e-12)
    logp, entropy = common.lm_head_logprobs(h, w, y, 0.7, with_entropy=True)  # the per-step log's entropy
    torch.testing.assert_close(logp, naive, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, common.token_entropy(h @ w.T, 0.7), rtol=0, atol=1e-12)
    assert not entropy.requires_grad and entropy.min() > 0


def test_model_path_matches_logits_path():
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.DEFAULT_MODEL)
    assert common.chunked_lm_head_ok(model)
    rollouts = [{"prompt_ids": tokenizer("Q: 3+4")["input_ids"][: 3 + i], "response_ids": list(range(10, 14 + 2 * i))}
                for i in range(3)]
    batch = common.pack_rollouts(rollouts, tokenizer.pad_token_id, "cpu")
    grads = []
    for chunked in (False, True):
        model.zero_grad()
        logp, entropy = common.response_logprobs(model, batch, 0.9, chunked_lm_head=chunked, with_entropy=True)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        grads.append((logp.detach(), [p.grad.clone() for p in model.parameters()], entropy))
    (lp_a, g_a, ent_a), (lp_b, g_b, ent_b) = grads
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_a, ent_b, rtol=0, atol=1e-5)
    assert (ent_a[batch["mask"]] > 0).all() and (ent_a[~batch["mask"]] == 0).all()
    assert max((a - b).abs().max().item() for a, b in zip(g_a, g_b)) <= 1e-5
    assert max(a.abs().max().item() for a in g_a) > 0


def test_chunked_projection_is_float32_under_autocast():
    """Under bf16 autocast the chunked head still projects in float32, in both passes: the log-probs and
    gradients are those of the float32 logits, and float32 master weights keep a float32 gradient."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(32, 16, generator=g) * 4).bfloat16().float().requires_grad_(True)
    w = torch.randn(64, 16, generator=g).requires_grad_(True)
    y = torch.randint(0, 64, (32,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = common.lm_head_logprobs(h.bfloat16(), w, y)  # a bf16 decoder output
    out.sum().backward()
    h_ref, w_ref = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = torch.log_softmax(h_ref @ w_ref.T, -1).gather(-1, y[:, None]).squeeze(-1)
    ref.sum().backward()
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-2, atol=1e-2)  # through the bf16 input's cast
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    assert w.grad.dtype == torch.float32


def test_logprobs_under_bf16_autocast_are_those_of_a_float32_projection():
    """The decoder runs in bf16 under --autocast, the LM head in float32 on every path: the log-probs equal
    log_softmax of a float32 projection of the same decoder output (a bf16 head would be off by up to
    ~0.04 nats here), and scoring log pi_0 reproduces the training forward bit for bit (ratio 1)."""
    model, tokenizer = common.load_model(common.DEFAULT_MODEL, autocast="bfloat16")
    g = torch.Generator().manual_seed(0)
    rollouts = [{"prompt_ids": torch.randint(4, 100, (5 + i,), generator=g).tolist(),
                 "response_ids": torch.randint(4, 100, (6 + 3 * i,), generator=g).tolist()} for i in range(4)]
    batch = common.pack_rollouts(rollouts, tokenizer.pad_token_id, "cpu")
    width = batch["labels"].shape[1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     position_ids=batch["position_ids"]).last_hidden_state[:, -width - 1:-1]
    weight = model.get_output_embeddings().weight.detach()
    expected = torch.log_softmax(hidden.float() @ weight.float().T / 0.9, -1)
    expected = expected.gather(-1, batch["labels"][..., None]).squeeze(-1) * batch["mask"]
    bf16_head = torch.log_softmax((hidden.bfloat16() @ weight.bfloat16().T).float() / 0.9, -1)
    bf16_head = bf16_head.gather(-1, batch["labels"][..., None]).squeeze(-1) * batch["mask"]
    assert (bf16_head - expected).abs().max() > 1e-2  # what a bf16 head would have cost
    ctx = common.Context(0, 0, 1, torch.device("cpu"))
    for chunked in (False, True):
        with torch.no_grad():
            logp = common.response_logprobs(model, batch, 0.9, chunked_lm_head=chunked)
        torch.testing.assert_close(logp, expected, rtol=0, atol=1e-4)
        scored = common.score_rollouts(model, rollouts, [[0, 1, 2, 3]], pad_id=tokenizer.pad_token_id,
                                       temperature=0.9, ctx=ctx, chunked_lm_head=chunked)
        model.train()
        train_logp = common.response_logprobs(model, batch, 0.9, chunked_lm_head=chunked)
        for row, s in enumerate(scored):
            assert torch.equal(s["logp"], train_logp[row, :len(rollouts[row]["response_ids"])].detach())


def test_response_logits_are_contiguous_and_exact():
    """logits_to_keep as an index tensor: exactly the T predicting positions, no strided view."""
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.DEFAULT_MODEL)
    rollouts = [{"prompt_ids": list(range(5, 9 + i)), "response_ids": list(range(10, 13 + i))} for i in range(3)]
    batch = common.pack_rollouts(rollouts, tokenizer.pad_token_id, "cpu")
    logits = common.response_logits(model, batch)
    width = batch["labels"].shape[1]
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"]).logits
    assert logits.is_contiguous() and logits.shape == (3, width, full.shape[-1])
    torch.testing.assert_close(logits, full[:, -width - 1:-1], rtol=0, atol=1e-5)


def test_chunked_path_under_autocast_scores_exactly_what_training_computes():
    """--chunked-lm-head --autocast bfloat16: the decoder runs in bf16 (the model's autocast reaches the
    chunked path), and scoring log pi_0 through the same path gives the training forward's log-probs bit
    for bit, so the first step's ratio is exactly 1."""
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.DEFAULT_MODEL, autocast="bfloat16")
    rollouts = [{"prompt_ids": list(range(5, 9 + i)), "response_ids": list(range(10, 16 + 2 * i))} for i in range(4)]
    ctx = common.Context(0, 0, 1, torch.device("cpu"))
    scored = common.score_rollouts(model, rollouts, [[0, 1, 2, 3]], pad_id=tokenizer.pad_token_id, temperature=0.9,
                                   ctx=ctx, chunked_lm_head=True)
    model.train()
    batch = common.pack_rollouts(rollouts, tokenizer.pad_token_id, "cpu")
    train_logp = common.response_logprobs(model, batch, 0.9, chunked_lm_head=True)
    assert train_logp.requires_grad
    for row, s in enumerate(scored):
        assert torch.equal(s["logp"], train_logp[row, :len(rollouts[row]["response_ids"])].detach())
    model.erpd_autocast = None  # the same path in float32 differs: autocast really was applied
    assert (common.response_logprobs(model, batch, 0.9, chunked_lm_head=True) - train_logp).abs().max() > 1e-4


def test_scoring_against_a_reference_with_the_chunked_flag_gives_the_full_columns():
    """score_rollouts(chunked_lm_head=True, ref_model=...) (eval and the drift curves with --chunked-lm-head):
    the KL needs both models' full logits, so it scores through them, and the columns are those of the
    unchunked call; against itself the exact KL is 0."""
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.DEFAULT_MODEL)
    rollouts = [{"prompt_ids": list(range(5, 9 + i)), "response_ids": list(range(10, 16 + 2 * i))} for i in range(3)]
    ctx = common.Context(0, 0, 1, torch.device("cpu"))
    score = dict(pad_id=tokenizer.pad_token_id, temperature=0.9, ctx=ctx, ref_model=model)
    chunked = common.score_rollouts(model, rollouts, [[0, 1, 2]], chunked_lm_head=True, **score)
    plain = common.score_rollouts(model, rollouts, [[0, 1, 2]], **score)
    for c, p in zip(chunked, plain):
        assert set(c) == {"logp", "entropy", "ref_logp", "kl"} and all(torch.equal(c[k], p[k]) for k in c)
        assert c["kl"].abs().max() < 1e-6 and torch.equal(c["logp"], c["ref_logp"])
