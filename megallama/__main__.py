from megallama.cli import run

run()
