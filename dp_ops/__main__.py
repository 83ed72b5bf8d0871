from dp_ops.cli import main

main()
