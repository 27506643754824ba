"""The Hugging Face adapter reads both spellings transformers has used (``past_key_values``
up to 5.23, ``cache`` from 5.24), so capture does not depend on the deprecated alias."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from qcompile import hf_adapter


class _OldForward(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None):
        return past_key_values


class _NewForward(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None):
        return cache


def test_cache_keyword_follows_the_forward_signature():
    assert hf_adapter.cache_keyword(_OldForward()) == "past_key_values"
    assert hf_adapter.cache_keyword(_NewForward()) == "cache"


def test_the_installed_transformers_llama_takes_the_keyword_the_adapter_names(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    keyword = hf_adapter.cache_keyword(model)
    cache = hf_adapter.ExportCache([torch.zeros(1, 2, 3, 16) for _ in range(4)])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 5,
                    dtype=torch.int64), use_cache=True, **{keyword: cache})
    keys = hf_adapter.cache_tensors(hf_adapter.output_cache(out))[0]
    assert keys.shape == (1, 2, 5, 16)  # 3 past positions + 2 new: the past was used
    assert torch.equal(keys[:, :, :3], torch.zeros(1, 2, 3, 16))


def test_output_cache_reads_either_field():
    old = CausalLMOutputWithPast(logits=torch.zeros(1), past_key_values="old-style")
    assert hf_adapter.output_cache(old) == "old-style"

    class NewOutput(dict):
        pass

    assert hf_adapter.output_cache(NewOutput(logits=1, cache="new-style")) == "new-style"


def test_attention_cache_pops_whichever_name_was_passed():
    for name in ("cache", "past_key_values"):
        kwargs = {name: "the cache", "position_ids": 3}
        assert hf_adapter.attention_cache(kwargs) == "the cache"
        assert kwargs == {"position_ids": 3}
    assert hf_adapter.attention_cache({"past_key_values": None, "cache": "new"}) == "new"


def test_export_cache_holds_the_past_without_an_update():
    past = [torch.full((1, 2, 4, 8), float(i)) for i in range(6)]
    cache = hf_adapter.ExportCache(past)
    assert len(cache.layers) == 3 and cache.get_seq_length() == 4
    assert all(a is b for a, b in zip(hf_adapter.cache_tensors(cache), past))
    keys, _ = cache.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8), 1)
    assert keys.shape[2] == 5 and torch.equal(keys[:, :, :4], past[2])
