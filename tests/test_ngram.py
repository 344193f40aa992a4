"""n-gram prompt lookup: unit tests on constructed histories, and exactness end to end."""

import pytest
import torch
from conftest import tiny_model

import specdec
from specdec import NGramProposer
from specdec.sampling import SamplingConfig
from specdec.state import DecodeState


def _state(rows, eos=()):
    width = max(len(r) for r in rows) + 8
    tokens = torch.zeros(len(rows), width + 1, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r)
    n = torch.tensor([len(r) for r in rows])
    return DecodeState(tokens=tokens, num_tokens=n, prompt_lengths=n.clone(),
                       active=torch.ones(len(rows), dtype=torch.bool), sampling=SamplingConfig(), generator=None,
                       vocab_size=100, max_len=width, eos=torch.tensor(list(eos), dtype=torch.long),
                       max_new_tokens=8)


def test_proposes_what_followed_the_most_recent_match():
    #          0  1  2  3  4  5  6  7  8  9  10 11
    history = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6]  # "5 6" last seen at 5 -> 7 1 2 5 ...
    drafts, probs = NGramProposer(max_ngram=2).propose(_state([history]), 4)
    assert probs is None and drafts.tolist() == [[7, 1, 2, 5]]


def test_longest_ngram_wins():
    history = [1, 2, 3, 9, 2, 3, 4, 1, 2, 3]  # 3-gram "1 2 3" -> 9; 2-gram "2 3" most recently -> 4
    assert NGramProposer(max_ngram=3).propose(_state([history]), 1)[0].tolist() == [[9]]
    assert NGramProposer(max_ngram=2).propose(_state([history]), 1)[0].tolist() == [[4]]


def test_no_match_proposes_nothing():
    drafts, _ = NGramProposer().propose(_state([[1, 2, 3, 4]]), 3)
    assert drafts.tolist() == [[-1, -1, -1]]


def test_proposal_stops_at_the_end_of_known_tokens():
    drafts, _ = NGramProposer(max_ngram=1).propose(_state([[4, 8, 4]]), 3)  # "4" -> 8 4, then nothing known
    assert drafts.tolist() == [[8, 4, -1]]


def test_never_proposes_past_an_eos():
    history = [3, 4, 2, 7, 7, 3, 4]  # "3 4" -> 2 (EOS) 7 7: the EOS may be proposed, nothing after it
    drafts, _ = NGramProposer(max_ngram=2).propose(_state([history], eos=[2]), 4)
    assert drafts.tolist() == [[2, -1, -1, -1]]


def test_rows_are_independent():
    drafts, _ = NGramProposer(max_ngram=1).propose(_state([[1, 2, 1], [5, 6, 7, 8]]), 2)
    assert drafts.tolist() == [[2, 1], [-1, -1]]


@pytest.mark.parametrize("sizes", [(0, 0), (3, 1), (-1, 2)])
def test_bad_ngram_sizes_are_refused(sizes):
    with pytest.raises(ValueError, match="ngram"):
        NGramProposer(max_ngram=sizes[1], min_ngram=sizes[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_with_ngram_equals_plain(arch):
    target = tiny_model(arch)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6], [9, 9, 9, 9, 9, 9, 9, 9]])
    plain = specdec.generate(target, ids, max_new_tokens=30, eos_token_id=[])
    out = specdec.generate(target, ids, max_new_tokens=30, eos_token_id=[], draft_model="ngram",
                           num_draft_tokens=5, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.stats.proposed > 0  # repetitive prompts: lookup found something to offer


def test_unknown_proposer_name_is_refused():
    with pytest.raises(ValueError, match="draft_model='medusa'"):
        specdec.generate(tiny_model("llama"), torch.tensor([[3]]), max_new_tokens=2, draft_model="medusa")
