"""Sums the pytest cases of one `bazel test` run into a closing line.

Reads the run's build-event file (not bazel-testlogs/, which keeps stale
results of targets outside the run) and each target's test.xml.
Prints per-target counts, then `N passed, N failed` alone on the last line.
"""
import json
import sys
import xml.etree.ElementTree as ET
from urllib.parse import unquote, urlparse


def count_cases(xml_path: str) -> tuple[int, int, int]:
    passed = failed = skipped = 0
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            failed += 1
        elif "skipped" in tags:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped


def main(bep_path: str) -> int:
    totals = [0, 0, 0]
    with open(bep_path) as bep:
        for line in bep:
            event = json.loads(line)
            result = event.get("testResult")
            if result is None:
                continue
            label = event["id"]["testResult"]["label"]
            xmls = [unquote(urlparse(o["uri"]).path) for o in result.get("testActionOutput", [])
                    if o.get("name") == "test.xml"]
            try:
                counts = count_cases(xmls[0]) if xmls else None
            except (OSError, ET.ParseError):
                counts = None
            if counts is None or sum(counts) == 0:
                # A target that died before writing cases still failed something.
                counts = (1, 0, 0) if result.get("status") == "PASSED" else (0, 1, 0)
            print(f"{label}: {counts[0]} passed, {counts[1]} failed, {counts[2]} skipped ({result.get('status')})")
            totals = [t + c for t, c in zip(totals, counts)]
    line = f"{totals[0]} passed, {totals[1]} failed"
    if totals[2]:
        line += f", {totals[2]} skipped"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
