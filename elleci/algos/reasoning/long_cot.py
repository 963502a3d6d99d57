"""Long chain-of-thought: the s1 think/answer SFT format, and budget forcing at inference.

Survey: Chen et al., "Towards Reasoning Era" (https://arxiv.org/abs/2503.09567); format and budget
forcing from s1 (Muennighoff et al., https://arxiv.org/abs/2501.19393; code simplescaling/s1).

    convs = long_cot_examples(arithmetic.make_problems(1000))        # [user question, assistant long CoT]
    examples = encode_sft(tok, convs)                                # prompt masked (labels -100)
    gen = model_generator(model)                                     # greedy, batched, with the cache
    out = budget_forcing(gen, prompt_ids(tok, prompts), BudgetTokens.from_tokenizer(tok), budget=16)
    texts = [tok.decode(r.response, skip_special_tokens=False) for r in out]

Assistant content (s1 `data/tokenization.py`), inside our ChatML template; `<|im_start|>` is one special
token of the tokenizer, so both delimiters are that token followed by a word:

    <|im_start|>think\\n{trace}\\n<|im_start|>answer\\nAnswer: {answer}

Budget forcing (s1 §3.1; spec §7.3). Thinking starts at prompt + "<|im_start|>think" and stops at the
next <|im_start|> (the end-of-thinking delimiter; <|im_end|> / <|endoftext|> also stop it):
  maximum  at most B thinking tokens; if the cap is hit the thinking is force-closed with
           "\\n<|im_start|>answer\\nFinal Answer:" (the newline only when the text does not already end
           with one), else closed with "<|im_start|>answer"; then the answer is generated (greedy).
  minimum  k times: when the model ends thinking, the delimiter is stripped, "Wait" appended and
           generation continues with at least one new token (vLLM's min_tokens = 1).
Budget per call, `variant`:
  "harness" the eval harness behind the paper's numbers: up to k + 1 calls, each with max B (not
           decremented); a call that hits the cap ends the extension; the thinking (inserted "Wait"s
           included) is then cut to B tokens, and the closing string follows the LAST call's finish
           reason (cap ⇒ "Final Answer:" close, stop ⇒ plain delimiter).
  "readme" the s1 README: each extension call gets what remains of B (B minus the tokens generated so
           far, "Wait"s not counted) and none is made once nothing remains.
`force=False` is the plain cap (the baseline of a test-time scaling curve): thinking that hits B is
cut there and no answer is forced (the response ends unanswered).

Glossary: B thinking budget in tokens; k number of suppressed ends of thinking ("Wait" insertions);
a generator is any callable gen(prefixes, max_new_tokens, stop_ids, min_new_tokens) -> [(new ids
without the stop token, stopped: bool)] (`model_generator` for an ElleciLM, `stepwise` for a toy).

Differences from the paper:
1. Token ids, not strings: delimiters, "Wait" and the closing string are encoded once by the tokenizer
   and appended as ids (s1 appends strings to a prompt that vLLM re-tokenizes).
2. The "newline only if not already there" test decodes the thinking when the tokens carry a `decode`,
   else compares the last ids with the newline's ids.
3. No "auto" budget (context − prompt − delimiters); B is an explicit integer.
4. Greedy decoding only (the paper's setting, T = 0).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from elleci.model.generation import left_pad

THINK = "<|im_start|>think"
ANSWER = "<|im_start|>answer"
FINAL_ANSWER = "\nFinal Answer:"
WAIT = "Wait"
VARIANTS = ("harness", "readme")
_FORMAT_RE = re.compile(
    r"\A<\|im_start\|>think\n(?P<think>.*\S.*?)\n<\|im_start\|>answer\n(?P<answer>Answer: [^\n]+)\Z", re.S)

Generator = Callable[[Sequence[Sequence[int]], int, Collection[int], int], list[tuple[list[int], bool]]]


# ----------------------------------------------------------------------------------------- format

def long_cot_response(trace: str, answer) -> str:
    """The assistant content: "<|im_start|>think\\n{trace}\\n<|im_start|>answer\\nAnswer: {answer}"."""
    if not str(trace).strip():
        raise ValueError("the reasoning trace is empty")
    return f"{THINK}\n{trace}\n{ANSWER}\nAnswer: {answer}"


def arithmetic_trace(problem) -> str:
    """The worked lines of an arithmetic solution ("x op y = r" per step), without its "Answer:" line."""
    lines = [ln for ln in problem.solution.splitlines() if not ln.startswith("Answer:")]
    if not lines:
        raise ValueError(f"problem {problem.question!r} has no worked step")
    return "\n".join(lines)


def long_cot_examples(problems: Sequence) -> list[list[dict]]:
    """[user question, assistant long-CoT answer] conversations (the worked solution becomes the trace)."""
    return [[{"role": "user", "content": p.question},
             {"role": "assistant", "content": long_cot_response(arithmetic_trace(p), p.answer)}] for p in problems]


def parse_long_cot(text: str) -> tuple[str, str] | None:
    """(thinking, answer section) of a response that follows the format exactly (decoded with its special
    tokens, without the final <|im_end|>): non-empty thinking, one "Answer: ..." line; else None."""
    m = _FORMAT_RE.match(text)
    if m is None or "<|im_start|>" in m.group("think"):                    # one think and one answer section
        return None
    return m.group("think"), m.group("answer")


def answer_section(text: str) -> str:
    """The text after the last answer delimiter ("<|im_start|>answer"), or all of it when there is none."""
    return text.rsplit(ANSWER, 1)[-1]


# ----------------------------------------------------------------------------------------- generators

@dataclass(frozen=True)
class BudgetTokens:
    """The ids budget forcing appends or stops at."""
    think: list[int]                       # "<|im_start|>think" (appended to the prompt)
    answer: list[int]                      # "<|im_start|>answer" (the plain close)
    final_answer: list[int]                # "\nFinal Answer:" (after `answer` in the forced close)
    newline: list[int]                     # "\n"
    wait: list[int]                        # "Wait" (the extension string)
    think_stop: list[int]                  # ends thinking: <|im_start|> (+ <|im_end|>, <|endoftext|>)
    answer_stop: list[int]                 # ends the answer: <|im_end|>, <|endoftext|>
    decode: Callable[[list[int]], str] | None = field(default=None, compare=False)

    @classmethod
    def from_tokenizer(cls, tokenizer, wait: str = WAIT) -> BudgetTokens:
        ends = [i for i in (tokenizer.im_end_id, tokenizer.eos_id) if i is not None]
        enc = tokenizer.encode
        return cls(think=enc(THINK), answer=enc(ANSWER), final_answer=enc(FINAL_ANSWER), newline=enc("\n"),
                   wait=enc(wait), think_stop=[tokenizer.im_start_id] + ends, answer_stop=ends,
                   decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False))

    def ends_with_newline(self, ids: Sequence[int]) -> bool:
        if self.decode is not None:
            return self.decode(list(ids)).endswith("\n")
        n = len(self.newline)
        return n > 0 and list(ids[-n:]) == list(self.newline)

    def forced_close(self, thinking: Sequence[int]) -> list[int]:
        """"\\n<|im_start|>answer\\nFinal Answer:", the first newline only if `thinking` lacks one at its end."""
        return ([] if self.ends_with_newline(thinking) else list(self.newline)) + self.answer + self.final_answer


def model_generator(model) -> Generator:
    """Greedy batched decoding with the model's cache, as a generator (see the module glossary).

    Rows of different lengths are left-padded and masked (`elleci.model.generation.left_pad`); a row stops
    at its first stop id, which is not returned. Stop ids are masked for the first `min_new_tokens` steps."""
    @torch.no_grad()
    def generate(prefixes, max_new_tokens, stop_ids, min_new_tokens=0):
        if not prefixes:
            return []
        device = next(model.parameters()).device
        ids, mask = left_pad(prefixes, pad_token_id=0, device=device)
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        try:
            cache = model.new_cache(ids.shape[0])
            h = model.hidden_states(ids, attention_mask=None if bool(mask.all()) else mask, cache=cache)
            out, stopped = [[] for _ in prefixes], [False] * len(prefixes)
            done = torch.zeros(len(prefixes), dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                logits = model.lm_head(h[:, -1]).float()                     # [B, V]
                if step < min_new_tokens and stop.numel():
                    logits[:, stop] = float("-inf")
                nxt = logits.argmax(-1)                                      # [B] greedy
                hit = torch.isin(nxt, stop) & ~done
                for b in (~done & ~hit).nonzero().flatten().tolist():
                    out[b].append(int(nxt[b]))
                for b in hit.nonzero().flatten().tolist():
                    stopped[b] = True
                done |= hit
                if bool(done.all()):
                    break
                if step + 1 < max_new_tokens:
                    h = model.hidden_states(nxt[:, None], cache=cache)
        finally:
            model.train(was_training)
        return list(zip(out, stopped))
    return generate


def stepwise(next_token: Callable[[list[int], frozenset], int]) -> Generator:
    """A generator from a per-sequence rule next_token(prefix, banned) -> id (toys for tests); `banned`
    holds the stop ids while fewer than `min_new_tokens` tokens are out (a rule may honour it)."""
    def generate(prefixes, max_new_tokens, stop_ids, min_new_tokens=0):
        stop, results = frozenset(stop_ids), []
        for prefix in prefixes:
            seq, new, stopped = list(prefix), [], False
            while len(new) < max_new_tokens:
                t = next_token(seq, stop if len(new) < min_new_tokens else frozenset())
                if t in stop:
                    stopped = True
                    break
                new.append(t)
                seq.append(t)
            results.append((new, stopped))
        return results
    return generate


# ----------------------------------------------------------------------------------------- budget forcing

@dataclass
class BudgetResult:
    """One row of `budget_forcing`: the response after the prompt is think + thinking + closing + answer."""
    think: list[int]
    thinking: list[int]            # thinking ids as kept (with the inserted "Wait"s; cut to B by "harness")
    closing: list[int]             # the appended close ([] when force=False and the cap was hit)
    answer: list[int]              # generated answer ids (without the stop id)
    calls: int                     # thinking-phase generator calls
    waits: int                     # "Wait" insertions
    generated: int                 # thinking tokens generated by the model ("Wait"s not counted)
    hit_length: bool               # the last thinking call hit its cap

    @property
    def response(self) -> list[int]:
        return self.think + self.thinking + self.closing + self.answer


def budget_forcing(generate: Generator, prompts: Sequence[Sequence[int]], tokens: BudgetTokens, *, budget: int,
                   num_ignore: int = 0, variant: str = "harness", force: bool = True,
                   max_answer_tokens: int = 16) -> list[BudgetResult]:
    """Think with budget forcing, then answer (greedy), for a batch of prompts (chat prompt ids with the
    generation prompt; "<|im_start|>think" is appended here). See the module docstring for the semantics."""
    if budget < 1 or num_ignore < 0 or max_answer_tokens < 0:
        raise ValueError(f"need budget >= 1, num_ignore >= 0, max_answer_tokens >= 0; got {budget}, "
                         f"{num_ignore}, {max_answer_tokens}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; choose one of {VARIANTS}")
    if num_ignore and not tokens.wait:
        raise ValueError("num_ignore > 0 needs a non-empty extension string (tokens.wait)")
    base = [list(p) + tokens.think for p in prompts]
    rows = [BudgetResult(list(tokens.think), [], [], [], 0, 0, 0, False) for _ in prompts]
    active, max_new, min_new = list(range(len(rows))), {i: budget for i in range(len(rows))}, 0
    for call in range(num_ignore + 1):
        outs = {}
        for cap in sorted({budget if variant == "harness" else max_new[i] for i in active}):
            group = [i for i in active if (budget if variant == "harness" else max_new[i]) == cap]
            outs.update(zip(group, generate([base[i] + rows[i].thinking for i in group], cap, tokens.think_stop,
                                            min_new)))
        nxt = []
        for i in active:
            new, stopped = outs[i]
            r = rows[i]
            r.thinking += new
            r.calls, r.generated, r.hit_length = r.calls + 1, r.generated + len(new), not stopped
            max_new[i] = budget - r.generated                                # the README's decrement
            if stopped and call < num_ignore and (variant == "harness" or max_new[i] > 0):
                r.thinking += tokens.wait                                    # strip the delimiter, "Wait"
                r.waits += 1
                nxt.append(i)
        active, min_new = nxt, 1
    for r in rows:
        if variant == "harness":
            r.thinking = r.thinking[:budget]                                 # the harness cuts to B
        r.closing = tokens.forced_close(r.thinking) if r.hit_length else list(tokens.answer)
        if r.hit_length and not force:
            r.closing = []                                                   # plain cap: no answer
    todo = [i for i, r in enumerate(rows) if r.closing and max_answer_tokens]
    answers = generate([base[i] + rows[i].thinking + rows[i].closing for i in todo], max_answer_tokens,
                       tokens.answer_stop, 0)
    for i, (new, _) in zip(todo, answers):
        rows[i].answer = new
    return rows
