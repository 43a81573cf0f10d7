-- Every process's database (each would also create its own at start if it were missing): the
-- services', and the stand-in card processor's ledger.
CREATE DATABASE orders;
CREATE DATABASE inventory;
CREATE DATABASE payments;
CREATE DATABASE gateway;
