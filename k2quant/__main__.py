from k2quant.cli.main import run

run()
