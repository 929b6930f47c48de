"""Writes data/crewdesk/inputs.jsonl: the third shipped task, a classification made by this project (no outside data).

Each row is one message that a pilot or cabin-crew member sends to the crew-control desk, and the queue it
belongs in: roster_change (swaps, days off, standby), sick_leave, fatigue (a fatigue report: the crew member
is not fit to fly; the rare class that matters most), training (simulator, recurrent courses, checks) or pay
(allowances, per diem, overtime). As real desks see them: shorthand, flight numbers and dates, a greeting or
none, the same frame with a different reason ("take me off tomorrow's LHR, I have a fever" / "..., I only slept
3 hours" / "..., I'd like to swap with Ana"), so a few words decide the label; a fifth of the messages give two
reasons of different queues, routed by urgency (fatigue, sickness, roster, training, pay); a share sent twice
by different people; 2% of the gold labels misfiled; imbalanced classes. Rows are grouped by sender: held-out
senders are never trained on.

  .venv/bin/python scripts/make_crewdesk.py [--rows 720] [--senders 260] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "crewdesk" / "inputs.jsonl"

# what each queue receives: its share of messages, and the reasons that make a message belong there
QUEUES = {
    "roster_change": (
        0.40,
        [
            "I'd like to swap with {name}",
            "can {name} take it instead, we agreed a swap",
            "I have a family wedding that day",
            "my leave request for that week was approved but the duty is still on",
            "I want to bid for the {dest} pairing instead",
            "please move me to standby",
            "it clashes with my part-time days",
            "I'm available for extra duties that week instead",
        ],
    ),
    "sick_leave": (
        0.20,
        [
            "I have a fever",
            "I've got a bad cold and blocked ears, can't equalise",
            "I have food poisoning since last night",
            "my doctor signed me off for a week",
            "I hurt my back and can't lift bags",
            "I'm sick with the flu",
        ],
    ),
    "training": (
        0.17,
        [
            "my sim session is booked on the same day",
            "my recurrent SEP training expires this month",
            "I still need the CRM refresher before that date",
            "the line check with {name} was moved",
            "I was told to do the type rating ground school then",
            "my first aid course certificate runs out",
        ],
    ),
    "pay": (
        0.15,
        [
            "the per diem for the {dest} night stop is missing from my payslip",
            "can I claim the call-out allowance for it",
            "my overtime for the delay was not paid",
            "the hotel costs I paid myself are not refunded yet",
            "the duty was paid as standby instead of flying",
            "my sector pay looks wrong for last month",
        ],
    ),
    "fatigue": (
        0.08,
        [
            "I only slept 3 hours after the late arrival",
            "I'm too tired after three early starts in a row",
            "I'm not fit to fly, the rest period was cut short",
            "I didn't get my minimum rest because the hotel was noisy all night",
            "I'm filing a fatigue report, I can't operate safely",
        ],
    ),
}
# the frames a message is written in: the same frame carries any queue's reason
FRAMES = [
    "Please take me off {flight} {when}, {reason}.",
    "{greeting}about my duty {when} ({flight}): {reason}.",
    "{flight} {day} - {reason}. thanks",
    "{greeting}{reason}, so I can't do {flight} {when}.",
    "Re {flight}/{day}: {reason}. Can you help?",
    "{greeting}{reason}. It's about the {time} report {when}.",
]
GREETINGS = ["Hi, ", "Hello crew control, ", "Good morning, ", "Hey, ", "", "", "Dear desk, "]
NAMES = ["Ana", "Tomasz", "Leila", "Marco", "Ingrid", "Kwame", "Sofia", "Jon", "Priya", "Yusuf", "Elena", "Bram"]
DESTS = ["LHR", "JFK", "DXB", "NRT", "GRU", "CPT", "SIN", "YYZ", "OSL", "MAD"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
RESENT = 0.03  # messages that another crew member sent word for word
# A message may give a second reason of another queue; the desk routes it by urgency: a crew member unfit to fly
# first (fatigue, then sickness), then the roster, training and pay. The student must learn the order, not a word.
SECOND = 0.2
URGENCY = ["fatigue", "sick_leave", "roster_change", "training", "pay"]
MISFILED = 0.02  # gold labels a busy desk got wrong, as every hand-labelled file has some


def reason(rng: random.Random, queue: str) -> str:
    return rng.choice(QUEUES[queue][1]).format(name=rng.choice(NAMES), dest=rng.choice(DESTS))


def message(rng: random.Random, queue: str, other: str | None) -> str:
    """A message of `queue`; with `other`, it gives that queue's reason too, in either order."""
    reasons = [reason(rng, queue)] + ([reason(rng, other)] if other else [])
    rng.shuffle(reasons)
    day = rng.choice([f"{rng.randint(1, 28)} {rng.choice(MONTHS)}", "tomorrow", "Saturday", "next Monday"])
    text = rng.choice(FRAMES).format(
        flight=f"{rng.choice(['DL', 'XQ', 'LX', 'EW'])}{rng.randint(10, 2999)}",
        day=day,
        when=day if day in ("tomorrow", "next Monday") else f"on {day}",
        time=f"{rng.randint(4, 22):02d}:{rng.choice(['00', '15', '30', '45'])}",
        greeting=rng.choice(GREETINGS),
        reason=rng.choice([", and ", "; also ", ". Besides, "]).join(reasons),
    )
    if rng.random() < 0.15:  # typed in a hurry
        text = text.lower()
    return text[0].upper() + text[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=720)
    parser.add_argument("--senders", type=int, default=260)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    senders = [f"S{rng.randint(10000, 99999)}" for _ in range(args.senders)]
    queues, weights = zip(*((q, share) for q, (share, _) in QUEUES.items()))
    rows: list[dict] = []
    for i in range(args.rows):
        if rows and rng.random() < RESENT:
            earlier = rng.choice(rows)
            text, label = earlier["message"], earlier["label"]
        else:
            label = rng.choices(queues, weights)[0]
            other = rng.choice([q for q in queues if q != label]) if rng.random() < SECOND else None
            text = message(rng, label, other)
            label = min(label, other or label, key=URGENCY.index)
            if rng.random() < MISFILED:
                label = rng.choice([q for q in queues if q != label])
        rows.append({"id": f"cd{i:04d}", "sender": rng.choice(senders), "message": text, "label": label})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    counts = {q: sum(r["label"] == q for r in rows) for q in queues}
    print(f"{OUT}: {len(rows)} messages from {len({r['sender'] for r in rows})} senders; {counts}")


if __name__ == "__main__":
    main()
