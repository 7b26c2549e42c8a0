from gliofed.cli import main

main()
