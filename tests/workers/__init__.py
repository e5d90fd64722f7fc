"""Scripts the tests start as processes, and the modules those share with the tests."""
