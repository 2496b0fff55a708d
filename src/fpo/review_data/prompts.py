"""Review-style prompts for controlled sentiment generation (the DPO paper's IMDb task).

The DPO paper prompts GPT-2 with prefixes of IMDb reviews; offline we build prefixes from
templates and word lists instead. Every prompt is *neutral*: no word of any template or
list carries sentiment in VADER's lexicon (genres such as comedy, horror, crime or romance
do and are left out), so the reference model can continue either way and the judge's
score reflects the completion alone. Titles are invented ("The Glass Harbor") so that no
real film's reputation leaks in. Prompts end without a trailing space: a completion starts
with its own whitespace, so ``prompt + completion`` is the full text.

``make_prompts(n, seed)`` draws n distinct prompts from the finite template space with a
seeded ``random.Random``; ``make_prompt_splits`` draws once and cuts, so train, test and
validation prompts are disjoint by construction. Validation prompts come *after* train and
test in the draw, so adding them leaves the train and test prompts of a seed unchanged.
"""

from __future__ import annotations

import math
import random
import string

from fpo.errors import UserError

TEMPLATES: tuple[str, ...] = (
    "I watched {title} last night and",
    "The {genre} film {title} is",
    "This {genre} movie, {title}, was",
    "{title} ({year}) is a {genre} film that",
    "I just finished watching {title}. Overall, the movie was",
    "My {person} and I saw {title} on {day}, and",
    "After seeing {title} at the {venue}, I think the film",
    "Going into {title}, I did not know what to expect. The",
    "{title} is a {genre} film from {year}, and I have to say it",
    "The director of {title} made a {genre} film about a {character}, and the result",
    "Having seen {title} twice now, I would describe it as",
    "The story of {title} follows a {character}, and the film",
    "If you are thinking about watching {title}, the",
    "Review of {title} ({year}): this {genre} film is",
    "I rented {title} for {day} night with my {person}. The acting",
    "The {genre} film {title} came out in {year}. In my view, it",
    "We put on {title} at the {venue}, and by the end I",
    "My thoughts on the {genre} film {title}: the script",
)

TITLE_FIRST: tuple[str, ...] = (
    "Glass", "Northern", "Paper", "Silver", "Harbor", "Winter", "Copper", "Station",
    "Autumn", "River", "Iron", "Velvet", "Granite", "Lantern", "Meridian", "Hollow",
    "Amber", "Cobalt", "Orchard", "Signal",
)  # fmt: skip
TITLE_SECOND: tuple[str, ...] = (
    "Harbor", "Road", "Summer", "Line", "Garden", "Horizon", "Tower", "Bridge",
    "Letters", "Season", "Crossing", "House", "Avenue", "Archive", "Coast", "Engine",
)  # fmt: skip
# Used as "a {genre} film": no vowel-initial genre, so the article always reads right.
GENRES: tuple[str, ...] = (
    "mystery", "western", "musical", "documentary", "science fiction", "period",
    "fantasy", "family", "historical", "sports", "spy", "detective", "heist",
    "courtroom", "road", "noir", "space", "monster", "martial arts", "French",
)  # fmt: skip
YEARS: tuple[str, ...] = tuple(str(year) for year in range(1968, 2024, 3))
PEOPLE: tuple[str, ...] = (
    "sister", "brother", "roommate", "father", "mother", "cousin", "neighbor",
    "coworker", "partner", "uncle",
)  # fmt: skip
DAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
VENUES: tuple[str, ...] = ("local cinema", "multiplex", "drive-in", "library screening", "campus")
CHARACTERS: tuple[str, ...] = (
    "retired teacher", "young pilot", "small-town sheriff", "chess player",
    "night-shift nurse", "ship captain", "jazz pianist", "farmer", "journalist",
    "lighthouse keeper", "taxi driver", "chemist",
)  # fmt: skip

SLOTS: dict[str, tuple[str, ...]] = {
    "title": tuple(f"The {a} {b}" for a in TITLE_FIRST for b in TITLE_SECOND if a != b),
    "genre": GENRES,
    "year": YEARS,
    "person": PEOPLE,
    "day": DAYS,
    "venue": VENUES,
    "character": CHARACTERS,
}


# A second test set (`fpo.review_data.new_templates`): templates and titles that no prompt
# of `make_prompt_splits` can have (train, test and validation use TEMPLATES and
# SLOTS["title"] only), so it measures what the policy learnt beyond train's phrasings.
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "Last {day}, the {venue} showed {title}, and my first reaction was that",
    "{title} runs just under two hours. Watching it, I found the pacing",
    "Someone at work told me to see {title}, a {genre} picture from {year}. Now that I have, I",
    "Here is what I thought of {title}: the ending",
    "Out of ten, I would give {title} ({year})",
    "Of all the {genre} films released in {year}, {title}",
    "In {title}, a {character} leaves home, and the screenplay",
    "When the lights came up after {title} at the {venue}, I",
    "My {person} chose {title} for our {day} movie night. Afterwards we both said the film",
    "A few words on {title}, the new {genre} release: the cast",
    "Five minutes into {title}, I already knew this film",
    "Compared with other {genre} films, {title}",
    "Watching {title} on a {day} evening, I paid attention to the camera work, which",
    "Should you see {title}? As someone who has seen it, I think it",
)
HELDOUT_TITLE_FIRST: tuple[str, ...] = (
    "Marble", "Cedar", "Harvest", "Slate", "Ivory", "Coral", "Timber", "Canvas", "Falcon",
    "Willow", "Basalt", "Pine",
)  # fmt: skip
HELDOUT_TITLE_SECOND: tuple[str, ...] = (
    "Valley", "Street", "Island", "Market", "Canal", "Orbit", "Quarry", "Ferry", "Depot",
    "Meadow", "Pier", "Junction",
)  # fmt: skip
HELDOUT_SLOTS: dict[str, tuple[str, ...]] = {
    **SLOTS,
    "title": tuple(f"The {a} {b}" for a in HELDOUT_TITLE_FIRST for b in HELDOUT_TITLE_SECOND),
}


def template_slots(template: str) -> list[str]:
    """The slot names of a template, in order of first appearance."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    return list(dict.fromkeys(names))


def num_distinct_prompts(
    templates: tuple[str, ...] = TEMPLATES, slots: dict[str, tuple[str, ...]] = SLOTS
) -> int:
    """Size of the prompt space: sum over templates of the product of their slot sizes."""
    return sum(math.prod(len(slots[name]) for name in template_slots(t)) for t in templates)


def make_prompts(
    n: int,
    seed: int = 0,
    templates: tuple[str, ...] = TEMPLATES,
    slots: dict[str, tuple[str, ...]] = SLOTS,
) -> list[str]:
    """``n`` distinct prompts, a deterministic function of ``(n, seed)``.

    Each draw picks a template uniformly, then each of its slots uniformly; duplicates are
    redrawn. Prefixes agree: ``make_prompts(n, s) == make_prompts(n + m, s)[:n]``.
    ``HELDOUT_TEMPLATES`` and ``HELDOUT_SLOTS`` give the second test set's prompts.
    """
    capacity = num_distinct_prompts(templates, slots)
    if not 0 <= n <= capacity // 2:  # keep rejection sampling fast
        raise UserError(f"make_prompts: n={n} must be between 0 and {capacity // 2}")
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[str] = []
    while len(prompts) < n:
        template = rng.choice(templates)
        prompt = template.format(**{k: rng.choice(slots[k]) for k in template_slots(template)})
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def make_prompt_splits(
    n_train: int, n_test: int, seed: int = 0, n_val: int = 0
) -> tuple[list[str], ...]:
    """Disjoint prompt lists: one draw of ``n_train + n_test + n_val``, then cuts.

    Returns ``(train, test)``, or ``(train, test, val)`` when ``n_val > 0``: validation is
    the draw's tail, so ``(train, test)`` are the same with and without it.
    """
    prompts = make_prompts(n_train + n_test + n_val, seed)
    train, test = prompts[:n_train], prompts[n_train : n_train + n_test]
    return (train, test, prompts[n_train + n_test :]) if n_val else (train, test)
