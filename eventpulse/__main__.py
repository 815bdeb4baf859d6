from eventpulse.cli import main

if __name__ == "__main__":  # not when a spawned process (a training set's share) imports it
    main(prog_name="eventpulse")
