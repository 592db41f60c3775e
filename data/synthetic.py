"""
The default dataset: seeded synthetic conversations whose answers need the history. Every answer
is short, checkable by exact match and tagged with its task family:

    note     "my locker code is 4821"       -> "ok"        (a fact to remember)
    recall   "what is my locker code?"      -> "4821"      (two or more turns after the note)
    arith    "start at 7" / "add 5" / "double it" -> "7" / "12" / "24"  (a running value, 0..99)
    sort     "9 4 7 1 sort"                 -> "1 4 7 9"   (instruction last: only the last word
    reverse  "q w e r reverse"              -> "r e w q"    says what to do with the data)
    minmax   "9 4 7 1 5 max" / "... min"    -> "9" / "1"   (instruction last, one-token answer)

Families mix within a conversation of 1 to 8 turns: a recall or an arith step may have to look
past unrelated turns. A byte-level model learns it on a CPU.
"""
import random

FAMILIES = ("note", "recall", "arith", "sort", "reverse", "minmax")
# data first, the instruction last: where attention inside a query matters mechanically
INSTRUCTION_LAST = ("minmax", "sort", "reverse")
POOLED = "instruction-last"  # the three pooled, in reports
MAX_TURNS = 8
MAX_FACTS = 3
RECALL_GAP = 2  # a fact is asked about at least this many turns after it was given
SYSTEM_PROMPTS = ("answer briefly.", "keep answers short.", "you are a careful assistant.")
SYSTEM_PROBABILITY = 0.25
COLORS = ("red", "blue", "green", "black", "white", "pink", "gray", "gold")
NAMES = ("ada", "bob", "max", "kim", "leo", "mia", "sam", "zoe")
DIGITS, LETTERS = "0123456789", "abcdefghijklmnopqrstuvwxyz"


def _digits(k):
    return lambda rng: "".join(rng.choice(DIGITS) for _ in range(k))


FACTS = {"locker code": _digits(4), "pin": _digits(4), "room number": _digits(3),  # -> its value
         "lucky number": lambda rng: str(rng.randint(0, 99)),
         "favorite color": lambda rng: rng.choice(COLORS),
         "cat's name": lambda rng: rng.choice(NAMES)}


class _State:
    """What one conversation has established so far."""

    def __init__(self):
        self.facts = {}      # fact -> value
        self.given_at = {}   # fact -> turn index of its note
        self.value = None    # running arithmetic value, once started


def _note(state, turn, rng):
    fact = rng.choice(sorted(set(FACTS) - set(state.facts)))
    state.facts[fact] = FACTS[fact](rng)
    state.given_at[fact] = turn
    return f"my {fact} is {state.facts[fact]}", "ok"


def _recallable(state, turn):
    return sorted(f for f, t in state.given_at.items() if turn - t >= RECALL_GAP)


def _recall(state, turn, rng):
    fact = rng.choice(_recallable(state, turn))
    return f"what is my {fact}?", state.facts[fact]


def _arith(state, turn, rng):
    if state.value is None:
        state.value = rng.randint(0, 99)
        return f"start at {state.value}", str(state.value)
    v, add, sub = state.value, rng.randint(1, 20), rng.randint(1, 20)
    steps = [(f"add {add}", v + add), (f"subtract {sub}", v - sub), ("double it", 2 * v)]
    if v % 2 == 0:
        steps.append(("halve it", v // 2))
    # never empty: adding fits below 80, subtracting from 80 up
    text, state.value = rng.choice([(text, r) for text, r in steps if 0 <= r <= 99])
    return text, str(state.value)


def _items(rng):
    pool = rng.choice((DIGITS, LETTERS))
    return [rng.choice(pool) for _ in range(rng.randint(3, 8))]


def _sort(state, turn, rng):
    items = _items(rng)
    return " ".join(items) + " sort", " ".join(sorted(items))


def _reverse(state, turn, rng):
    items = _items(rng)
    return " ".join(items) + " reverse", " ".join(reversed(items))


def _minmax(state, turn, rng):
    # causally a digit knows neither whether it is wanted (the instruction comes after it) nor how
    # it compares with the digits after it; under ISM, after one layer, it can know both
    items = [rng.choice(DIGITS) for _ in range(rng.randint(4, 10))]
    instruction = rng.choice(("max", "min"))
    return " ".join(items) + " " + instruction, (max if instruction == "max" else min)(items)


def _choices(state, turn, n_turns):
    """(family, weight, make_turn) of the families that can come next: recall and arith, the turns
    that need the history, are favoured once possible; a fact only if there is time to ask it."""
    choices = [("sort", 1, _sort), ("reverse", 1, _reverse), ("minmax", 1, _minmax)]
    if len(state.facts) < MAX_FACTS and n_turns - turn > RECALL_GAP:
        choices.append(("note", 1.5, _note))
    if _recallable(state, turn):
        choices.append(("recall", 3, _recall))
    choices.append(("arith", 1.5 if state.value is None else 3, _arith))
    return choices


def conversation(rng, max_turns=MAX_TURNS):
    """A random conversation of 1 to max_turns turns: {"messages", "tasks" (one per answer)}."""
    messages = []
    if rng.random() < SYSTEM_PROBABILITY:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    state, tasks, n_turns = _State(), [], rng.randint(1, max_turns)
    for turn in range(n_turns):
        choices = _choices(state, turn, n_turns)
        family, _, make_turn = rng.choices(choices, weights=[w for _, w, _ in choices])[0]
        query, answer = make_turn(state, turn, rng)
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        tasks.append(family)
    return {"messages": messages, "tasks": tasks}


def generate(n, seed, max_turns=MAX_TURNS):
    """n distinct conversations, the same for the same seed (each prefix of the list too)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        conv = conversation(rng, max_turns)
        key = tuple((m["role"], m["content"]) for m in conv["messages"])
        if key not in seen:
            seen.add(key)
            out.append(conv)
    return out


def splits(n_train, n_val, seed, max_turns=MAX_TURNS):
    """(train, val), disjoint. val comes first, so it is the same for a seed whatever n_train."""
    convs = generate(n_val + n_train, seed, max_turns)
    return convs[n_val:], convs[:n_val]


def example_prompts(seed=0):
    """Prompts to try on a model trained on this data: a fact, a sort, a running sum, a recall."""
    rng, state = random.Random(seed), _State()
    prompts = [_note(state, 0, rng)[0], _sort(state, 1, rng)[0], _arith(state, 2, rng)[0]]
    return prompts + [_recall(state, 3, rng)[0]]


def percent(x):
    """A share as a percentage with one decimal, "-" for none."""
    return "-" if x is None else f"{100 * x:.1f}"


def family_label(family):
    """A family's name in reports: the instruction-last ones (and their pooled row) in bold."""
    if family == POOLED:
        return f"**{POOLED}** (pooled)"
    return f"**{family}**" if family in INSTRUCTION_LAST else family
