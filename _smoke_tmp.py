import torch, warnings, hf_moe_opt, copy
from tests.models import tiny_switch, tiny_nllb, VOCAB
for fam, build in [("switch", tiny_switch), ("nllb", tiny_nllb)]:
    ref = build(num_experts=8); hf_moe_opt.optimize(ref, capacity="none")
    for pol in ["lifo","lru","lfu","fifo","lfru"]:
        for slots in [1, 2, 3, 5, 8]:
            m = build(num_experts=8)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                hf_moe_opt.optimize(m, capacity="none", expert_cache=slots, cache_policy=pol)
            g = torch.Generator().manual_seed(1)
            for t in range(3):
                ids = torch.randint(3, VOCAB, (3, 9), generator=g); dec = torch.randint(3, VOCAB, (3, 5), generator=g)
                with torch.no_grad():
                    a = ref(input_ids=ids, decoder_input_ids=dec).logits
                    b = m(input_ids=ids, decoder_input_ids=dec).logits
                assert torch.equal(a, b), (fam, pol, slots, (a-b).abs().max())
            st = hf_moe_opt.stats(m)
    print(fam, "ok", len(w), list(st.values())[0])
