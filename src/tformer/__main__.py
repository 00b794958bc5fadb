from tformer.cli.main import main

main()
