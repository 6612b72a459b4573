"""What runs inside Ray tasks and actors: prompt sampling now; decode, teacher, target encoding, writes next."""
