"""Kaggle packaging: build.py (the three uploads), push.py (the kaggle CLI), kernel_template.py."""
