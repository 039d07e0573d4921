from k2quant.cli import main

main()
