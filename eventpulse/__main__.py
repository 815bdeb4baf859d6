from eventpulse.cli import main

main()
