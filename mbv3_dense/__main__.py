from mbv3_dense.cli import main

main()
