"""``python -m fairness.toyworld.perception OUT_DIR``: build a perception bundle."""

from fairness.toyworld.perception.build import main

if __name__ == "__main__":
    main()
