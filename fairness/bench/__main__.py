import sys

from fairness.bench import dft, suite

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(dft.main(argv[1:]) if argv[:1] == ["dft"] else suite.main(argv))
