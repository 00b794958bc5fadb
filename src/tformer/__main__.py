from tformer.cli.launch import entry

entry()
