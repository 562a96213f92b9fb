"""Generate the sample inputs in data/sample/ (deterministic; run from the project root).

    python scripts/make_samples.py

reviews.parquet: 300 product reviews (review_id, product, rating, text).
articles.jsonl: 40 short news-style articles (article_id, section, title, body).
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


def main() -> None:
    rng = random.Random(20261129)
    OUT.mkdir(parents=True, exist_ok=True)
    pq.write_table(reviews(rng), OUT / "reviews.parquet")
    with (OUT / "articles.jsonl").open("w", encoding="utf-8") as handle:
        for article in articles(rng):
            handle.write(json.dumps(article) + "\n")
    print(f"wrote {OUT / 'reviews.parquet'} and {OUT / 'articles.jsonl'}")


if __name__ == "__main__":
    main()
