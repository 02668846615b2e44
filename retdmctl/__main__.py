from retdmctl.cli import entry

entry()
