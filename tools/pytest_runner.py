"""Runs the pytest files a Bazel test target names, reporting to Bazel's XML.

Writing $XML_OUTPUT_FILE ourselves makes Bazel keep pytest's per-case
results, which .ci/run sums into its closing line.
"""
import os
import sys

import pytest


def main() -> int:
    args = ["-p", "no:cacheprovider", "-q", "-rfEs"]
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args.append(f"--junitxml={xml}")
    code = pytest.main(args + sys.argv[1:])
    # A target whose files hold no test is a mistake, not a pass.
    return 1 if code == pytest.ExitCode.NO_TESTS_COLLECTED else int(code)


if __name__ == "__main__":
    sys.exit(main())
