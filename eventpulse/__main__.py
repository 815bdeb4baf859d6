from eventpulse.cli import main

main(prog_name="eventpulse")
