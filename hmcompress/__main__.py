from hmcompress.cli import main

main()
