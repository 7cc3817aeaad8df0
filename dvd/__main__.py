from dvd.cli import main

# Guarded: processes started with multiprocessing's spawn import this module again (as
# __mp_main__) and must not run the command a second time.
if __name__ == "__main__":
    raise SystemExit(main())
