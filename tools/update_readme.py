"""Regenerate the registry tables of README.md from `visattn list --markdown`."""

from pathlib import Path

from visattn.cli import markdown_tables

START, END = '<!-- registry:start -->', '<!-- registry:end -->'

readme = Path(__file__).parents[1] / 'README.md'
text = readme.read_text()
head, rest = text.split(START)
_, tail = rest.split(END)
readme.write_text(f'{head}{START}\n{markdown_tables()}\n{END}{tail}')
print(f'updated {readme}')
