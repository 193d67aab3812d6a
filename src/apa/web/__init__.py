"""`apa serve`: people rate images in a browser; each person's ratings drive their own session."""
