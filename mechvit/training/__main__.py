from mechvit.training.cli import main

main()
