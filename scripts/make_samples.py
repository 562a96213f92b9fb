"""Generate the sample inputs in data/sample/ (deterministic; run from the project root).

    python scripts/make_samples.py

reviews.parquet: 300 product reviews (review_id, product, rating, text).
articles.jsonl: 40 short news-style articles (article_id, section, title, body).
code_snippets.jsonl: 24 Python functions with a hole in the middle (snippet_id, language,
    before, after), for the FIM sample job.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path("data/sample")

PRODUCTS = [
    "trail running shoes",
    "espresso machine",
    "noise-cancelling headphones",
    "standing desk",
    "cast iron skillet",
    "electric toothbrush",
    "robot vacuum",
    "mechanical keyboard",
    "air purifier",
    "hiking backpack",
    "smart thermostat",
    "yoga mat",
]
OPENINGS = {
    5: ["Absolutely love this {p}.", "Best {p} I have owned.", "This {p} exceeded my hopes."],
    4: ["Solid {p} overall.", "Happy with this {p}.", "Good {p} for the price."],
    3: ["The {p} is fine, nothing special.", "Mixed feelings about this {p}.", "An okay {p}."],
    2: ["Disappointed with this {p}.", "The {p} did not hold up.", "Expected more from this {p}."],
    1: ["Terrible {p}.", "This {p} broke within a week.", "Do not buy this {p}."],
}
DETAILS = {
    "good": [
        "Setup took five minutes.",
        "It feels well built.",
        "Shipping was fast.",
        "The battery lasts for days.",
        "It is quieter than my old one.",
        "Customer support answered within an hour.",
        "Worth every penny.",
    ],
    "bad": [
        "The instructions were confusing.",
        "It arrived with a scratch.",
        "The app keeps disconnecting.",
        "Returns were a hassle.",
        "It is louder than advertised.",
        "One part cracked after a month.",
    ],
    "neutral": [
        "It comes in three colours.",
        "I use it every morning.",
        "The box was large.",
        "It replaced an older model.",
        "My partner uses it more than I do.",
    ],
}
SECTIONS = ["science", "business", "technology", "health", "climate", "culture"]
SUBJECTS = [
    "a regional power grid",
    "a city council",
    "a university lab",
    "a shipping company",
    "a startup building batteries",
    "a public library network",
    "a hospital group",
    "a coastal town",
    "a satellite operator",
    "a farming cooperative",
]
EVENTS = [
    "announced a plan to cut its energy use by a third within five years",
    "published results from a two-year study of local air quality",
    "opened a new facility that will employ several hundred people",
    "reported record demand after a cold winter",
    "began testing a new way to recycle lithium from old batteries",
    "agreed to share its data with independent researchers",
]
FOLLOW = [
    "Officials said the first phase would start next spring.",
    "Critics questioned whether the timeline was realistic.",
    "The project is funded partly by a public grant.",
    "Residents will be able to comment on the proposal until the end of the month.",
    "Similar efforts elsewhere have had mixed results.",
    "Analysts expect costs to fall as the technology matures.",
    "A spokesperson declined to give a figure for the total budget.",
    "The findings will be presented at a conference in the autumn.",
]


def reviews(rng: random.Random, count: int = 300) -> pa.Table:
    rows: dict[str, list[object]] = {"review_id": [], "product": [], "rating": [], "text": []}
    for index in range(count):
        product = rng.choice(PRODUCTS)
        rating = rng.choices([1, 2, 3, 4, 5], weights=[1, 1, 2, 3, 4])[0]
        mood = "good" if rating >= 4 else "bad" if rating <= 2 else "neutral"
        sentences = [rng.choice(OPENINGS[rating]).format(p=product)]
        sentences += rng.sample(DETAILS[mood], k=rng.randint(1, 3))
        sentences += rng.sample(DETAILS["neutral"], k=rng.randint(0, 2))
        rows["review_id"].append(f"r{index + 1:04d}")
        rows["product"].append(product)
        rows["rating"].append(rating)
        rows["text"].append(" ".join(sentences))
    return pa.table(rows)


def articles(rng: random.Random, count: int = 40) -> list[dict[str, object]]:
    out = []
    for index in range(count):
        subject = rng.choice(SUBJECTS)
        event = rng.choice(EVENTS)
        paragraphs = []
        for _ in range(rng.randint(3, 6)):
            paragraphs.append(" ".join(rng.sample(FOLLOW, k=rng.randint(2, 4))))
        body = f"{subject.capitalize()} {event}. " + "\n\n".join(paragraphs)
        verb, rest = event.split(" ", 1)
        out.append(
            {
                "article_id": index + 1,
                "section": rng.choice(SECTIONS),
                "title": f"{subject.capitalize()} {verb} {' '.join(rest.split()[:4])}",
                "body": body,
            }
        )
    return out


FUNCTIONS = [
    ("mean", "values", "average of a list of numbers", "total / len(values)"),
    ("clamp", "x, low, high", "x limited to the range [low, high]", "result"),
    ("slugify", "title", "a URL-friendly version of a title", "slug.strip('-')"),
    ("word_count", "text", "how many words a text has", "len(words)"),
    (
        "is_palindrome",
        "text",
        "whether a text reads the same backwards",
        "cleaned == cleaned[::-1]",
    ),
    ("chunk", "items, size", "items split into lists of at most size", "chunks"),
    ("median", "values", "the middle value of a list of numbers", "middle"),
    ("dedupe", "items", "items without repeats, first occurrence kept", "kept"),
]


def _argument(rng: random.Random, name: str) -> str:
    """A plausible literal for an argument, by its name."""
    if name in ("values", "items"):
        return repr([rng.randint(1, 9) for _ in range(rng.randint(3, 6))])
    if name in ("text", "title"):
        return repr(rng.choice(["Never odd or even", "Hello, batch world", "A man a plan"]))
    return str(rng.randint(1, 9))


def code_snippets(rng: random.Random, count: int = 24) -> list[dict[str, object]]:
    """Functions whose body is the hole: ``before`` is the signature and docstring,
    ``after`` is the return line and a call."""
    out = []
    for index in range(count):
        name, args, doc, result = FUNCTIONS[index % len(FUNCTIONS)]
        indent = " " * 4
        before = f'def {name}({args}):\n{indent}"""Return {doc}."""\n'
        call = ", ".join(_argument(rng, arg) for arg in args.split(", "))
        after = f"{indent}return {result}\n\n\nprint({name}({call}))\n"
        out.append(
            {
                "snippet_id": f"s{index + 1:02d}",
                "language": "python",
                "before": before,
                "after": after,
            }
        )
    return out


def main() -> None:
    rng = random.Random(20261129)
    OUT.mkdir(parents=True, exist_ok=True)
    pq.write_table(reviews(rng), OUT / "reviews.parquet")
    with (OUT / "articles.jsonl").open("w", encoding="utf-8") as handle:
        for article in articles(rng):
            handle.write(json.dumps(article) + "\n")
    with (OUT / "code_snippets.jsonl").open("w", encoding="utf-8") as handle:
        for snippet in code_snippets(random.Random(7)):
            handle.write(json.dumps(snippet) + "\n")
    print(f"wrote {OUT / 'reviews.parquet'}, {OUT / 'articles.jsonl'}, ...")


if __name__ == "__main__":
    main()
