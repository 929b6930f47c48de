"""Writes data/techlog/inputs.jsonl: the second shipped task, made by this project (no outside data).

Each row is one free-text aircraft technical-log entry, as crews and engineers write them (shorthand,
mixed case, reordered clauses), and its gold record: the structured fields a maintenance-tracking
system needs. The task for the student: read the entry, answer with the record as JSON that satisfies
data/techlog/schema.json. Entries are grouped by aircraft: held-out aircraft are never trained on.

  .venv/bin/python scripts/make_techlog.py [--rows 600] [--aircraft 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "techlog" / "inputs.jsonl"

# component -> (ATA chapter, ways crews write it, ECAM/EICAS style message)
COMPONENTS = {
    "pack 1": (21, ["PACK 1", "pack 1", "air cond pack 1"], "AIR PACK 1 FAULT"),
    "pack 2": (21, ["PACK 2", "pack 2", "air cond pack 2"], "AIR PACK 2 FAULT"),
    "cabin temperature sensor": (21, ["cabin temp sensor", "cabin temperature sensor"], "CAB TEMP SENSOR"),
    "generator 1": (24, ["GEN 1", "gen 1", "engine 1 generator"], "ELEC GEN 1 FAULT"),
    "battery 2": (24, ["BAT 2", "battery 2"], "ELEC BAT 2 FAULT"),
    "galley oven": (25, ["galley oven", "oven in fwd galley", "aft galley oven"], None),
    "passenger seat": (25, ["pax seat", "passenger seat", "seat recline"], None),
    "lavatory smoke detector": (26, ["lav smoke detector", "lavatory smoke detector"], "SMOKE LAV DET FAULT"),
    "aileron": (27, ["L aileron", "aileron", "R aileron"], "F/CTL AIL SERVO FAULT"),
    "flap": (27, ["flaps", "flap", "flap asymmetry"], "F/CTL FLAPS FAULT"),
    "fuel quantity indicator": (
        28,
        ["FQI", "fuel qty indication", "fuel quantity indicator"],
        "FUEL F USED/FOB DISAGREE",
    ),
    "hydraulic pump": (29, ["green hyd pump", "hyd pump", "yellow elec pump"], "HYD G ENG 1 PUMP LO PR"),
    "windshield heat": (30, ["windshield heat", "WSHLD heat", "window heat"], "ANTI ICE L WSHLD"),
    "landing gear": (32, ["L/G", "landing gear", "nose gear"], "L/G SHOCK ABSORBER FAULT"),
    "brake": (32, ["brake", "No 3 brake", "brake unit"], "BRAKES HOT"),
    "tyre": (32, ["tyre", "No 2 tyre", "nose wheel tyre"], None),
    "landing light": (33, ["landing light", "L landing light", "LDG light"], None),
    "reading light": (33, ["reading light", "pax reading light", "row light"], None),
    "weather radar": (34, ["WXR", "wx radar", "weather radar"], "NAV WX RADAR FAULT"),
    "pitot probe": (34, ["pitot", "capt pitot probe", "pitot probe"], "NAV IAS DISAGREE"),
    "oxygen mask": (35, ["O2 mask", "crew oxygen mask", "pax O2 mask"], None),
    "bleed valve": (36, ["bleed valve", "ENG 2 bleed", "HP valve"], "AIR ENG 2 BLEED FAULT"),
    "water heater": (38, ["water heater", "lav water heater"], None),
    "toilet": (38, ["toilet", "lav toilet", "vacuum toilet"], "WASTE SYS FAULT"),
    "apu starter": (49, ["APU starter", "apu start motor"], "APU AUTO SHUT DOWN"),
    "cargo door": (52, ["fwd cargo door", "cargo door", "aft cargo door"], "DOOR FWD CARGO"),
    "passenger door seal": (52, ["door 1L seal", "pax door seal", "door seal"], None),
    "engine oil pressure sensor": (79, ["eng 1 oil press sensor", "oil pressure transmitter"], "ENG 1 OIL LO PR"),
}
PHASES = {
    "preflight": ["on walkaround", "during preflight", "at pre-flight check", "at the walkaround"],
    "taxi": ["during taxi out", "on taxi", "while taxiing in"],
    "climb": ["in climb", "during climb out", "passing FL100 in climb"],
    "cruise": ["during cruise", "in cruise at FL350", "at cruise"],
    "descent": ["in descent", "during descent", "on descent"],
    "landing": ["on landing", "at touchdown", "during landing roll"],
}
ACTIONS = {
    "replaced": ["{c} replaced, ops check good", "Replaced {c}. Ops test satisfactory.", "{c} changed, tested ok"],
    "repaired": [
        "{c} repaired IAW AMM, ops check good",
        "Rectified: {c} rewired and secured.",
        "{c} fixed, leak check ok",
    ],
    "reset": ["{c} reset IAW TSM, fault cleared", "CB reset, {c} recovered", "Reset carried out, {c} normal"],
    "inspected_no_fault": [
        "{c} inspected, no fault found",
        "Checked {c} IAW AMM, NFF",
        "Insp of {c} carried out, nil defects",
    ],
    "deferred": [
        "{c} deferred IAW MEL {mel}",
        "Deferred under MEL item {mel}, {c} placarded INOP",
        "MEL {mel} applied, {c} INOP",
    ],
}
# nationality prefix -> letters after it, as the registers write them (D-AIBC, EI-FMV, G-EZTH, N123AB, B-1234)
PREFIXES = {"D-A": 3, "EI-": 3, "G-": 4, "OE-L": 2, "PH-": 3, "SE-R": 2, "VH-": 3, "9H-": 3, "N": 0, "B-": 0}
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def registration(rng: random.Random) -> str:
    prefix = rng.choice(sorted(PREFIXES))
    if prefix == "N":
        return f"N{rng.randint(100, 999)}{rng.choice(LETTERS)}{rng.choice(LETTERS)}"
    if prefix == "B-":
        return f"B-{rng.randint(1000, 9999)}"
    return prefix + "".join(rng.choice(LETTERS) for _ in range(PREFIXES[prefix]))


def entry(rng: random.Random, aircraft: str) -> tuple[str, dict]:
    component = rng.choice(sorted(COMPONENTS))
    ata, names, message = COMPONENTS[component]
    phase = rng.choice(sorted(PHASES))
    action = rng.choice(sorted(ACTIONS))
    name = rng.choice(names)
    mel = f"{ata:02d}-{rng.randint(10, 99):02d}-{rng.randint(1, 9):02d}" if action == "deferred" else None
    reporter = rng.choice(["Crew reported", "Capt reports", "F/O noted", "CC reported", "Eng found"])
    symptom = (
        f"{message} msg"
        if message and rng.random() < 0.6
        else rng.choice(["INOP", "u/s", "intermittent", "not working"])
    )
    defect = f"{reporter} {name} {symptom} {rng.choice(PHASES[phase])}."
    if rng.random() < 0.3:
        defect = f"{rng.choice(PHASES[phase]).capitalize()}, {reporter.lower()} {name} {symptom}."
    fix = rng.choice(ACTIONS[action]).format(c=name, mel=mel)
    where = rng.choice([f"A/C {aircraft}", f"{aircraft}", f"Reg {aircraft}"])
    text = rng.choice([f"{where}: {defect} {fix}", f"{defect} {fix} ({where})", f"{where}. {defect} Action: {fix}"])
    record = {
        "aircraft": aircraft,
        "phase": phase,
        "ata_chapter": ata,
        "component": component,
        "action": action,
        "deferred": action == "deferred",
        "mel_item": mel,
    }
    return text, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600)
    # many aircraft, few entries each: a student that memorises registrations fails on held-out ones,
    # so it has to learn to copy them from the entry
    parser.add_argument("--aircraft", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    fleet = sorted({registration(rng) for _ in range(args.aircraft)})
    rows = []
    for i in range(args.rows):
        aircraft = rng.choice(fleet)
        text, record = entry(rng, aircraft)
        rows.append({"id": f"tl{i:04d}", "aircraft": aircraft, "entry": text, "record": record})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{OUT}: {len(rows)} entries, {len(fleet)} aircraft")


if __name__ == "__main__":
    main()
