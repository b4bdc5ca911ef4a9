"""Appends rows to benchmarks/RESULTS.md: one table per section, each row with its command."""

from __future__ import annotations

import os
import pathlib

# BNSYNTH_RESULTS_MD: another file to append to (launch/device_rows.sh: a copy that comes back).
RESULTS = pathlib.Path(os.environ.get('BNSYNTH_RESULTS_MD')
                       or pathlib.Path(__file__).resolve().parent / 'RESULTS.md')


def append_row(section: str, title: str, header: list[str], row: list[str],
               path: pathlib.Path = RESULTS) -> None:
  """Inserts `row` at the end of the table of `section` (created if missing)."""
  begin, end = f'<!-- begin {section} -->', f'<!-- end {section} -->'
  text = path.read_text() if path.exists() else '# Benchmark results\n\n'
  line = '| ' + ' | '.join(str(c).replace('|', '\\|') for c in row) + ' |'
  if begin not in text:
    table = ['', f'## {title}', '', begin, '| ' + ' | '.join(header) + ' |',
             '|' + '---|' * len(header), end, '']
    text = text.rstrip('\n') + '\n' + '\n'.join(table)
  head, tail = text.split(end, 1)
  text = head + line + '\n' + end + tail
  tmp = path.with_suffix('.md.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)
