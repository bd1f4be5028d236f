"""Message content: Liquid templates and the headers that go with them."""
