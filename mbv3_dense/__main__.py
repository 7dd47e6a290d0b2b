from mbv3_dense.training.cli import main

main()
