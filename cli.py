"""Run the attngen command from a checkout: python cli.py build --model llama-3.1-8b"""
from attngen.cli import main

if __name__ == "__main__":
    main()
